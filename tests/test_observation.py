"""Views: exact slices of a hand-made stream, and the masked view's seeded, stable mask."""

from __future__ import annotations

import pytest
import torch

from collective.run.observation import Observer
from collective.scenario import (
    FullView,
    LaggedView,
    MaskedView,
    NodeSpec,
    NoView,
    SilentMessage,
    WindowView,
)

STREAM = torch.arange(100, 200)  # token id = 100 + stream position
PLACEHOLDER = 7


def _node(node_id: str, view) -> NodeSpec:
    return NodeSpec(id=node_id, model="m", view=view, message=SilentMessage())


def _observer(*nodes: NodeSpec, seed: int = 0, round_tokens: int = 8, context_tokens: int = 12) -> Observer:
    return Observer(
        STREAM,
        list(nodes),
        seed=seed,
        round_tokens=round_tokens,
        context_tokens=context_tokens,
        placeholder_ids={node.id: PLACEHOLDER for node in nodes},
    )


def _positions(ids: torch.Tensor) -> list[int]:
    return (ids - 100).tolist()


@pytest.mark.parametrize(
    ("view", "prefix"),
    [
        (FullView(), range(28, 40)),  # context_tokens = 12
        (FullView(tokens=5), range(35, 40)),
        (WindowView(tokens=4), range(36, 40)),
        (WindowView(tokens=0), range(0)),
        (LaggedView(tokens=4, lag=3), range(33, 37)),
        (NoView(), range(0)),
    ],
)
def test_each_view_sees_its_exact_slice_before_the_round(view, prefix):
    seen = _observer(_node("a", view)).observe("a", 40)
    assert _positions(seen.prefix_ids) == list(prefix)
    assert _positions(seen.round_inputs) == list(range(40, 48))  # the round itself, read causally
    assert _positions(seen.seen_ids) == list(prefix) + list(range(40, 48))


@pytest.mark.parametrize(
    ("view", "prefix"),
    [
        (FullView(), range(0, 3)),
        (WindowView(tokens=10), range(0, 3)),
        (LaggedView(tokens=4, lag=2), range(0, 1)),
        (LaggedView(tokens=4, lag=5), range(0)),
    ],
)
def test_a_view_is_clipped_at_the_start_of_the_stream(view, prefix):
    seen = _observer(_node("a", view)).observe("a", 3)
    assert _positions(seen.prefix_ids) == list(prefix)


def test_targets_and_the_reference_see_the_true_unmasked_stream():
    observer = _observer(_node("a", MaskedView(tokens=6, keep=0.0)))
    assert _positions(observer.targets(40)) == list(range(40, 48))
    reference = observer.reference(40)
    assert _positions(reference.prefix_ids) == list(range(28, 40))
    assert _positions(reference.round_inputs) == list(range(40, 48))


def test_an_observation_does_not_alias_the_stream():
    observer = _observer(_node("a", WindowView(tokens=4)))
    seen = observer.observe("a", 40)
    seen.prefix_ids[:] = -1
    seen.round_inputs[:] = -1
    assert _positions(observer.observe("a", 40).seen_ids) == list(range(36, 48))


def _mask_of(observer: Observer, node_id: str, start: int) -> dict[int, bool]:
    """stream position -> kept, for everything the node sees in the round starting at `start`."""
    seen = observer.observe(node_id, start)
    view = observer._nodes[node_id].view
    positions = list(range(start - view.tokens, start + observer.round_tokens))
    return {p: int(t) != PLACEHOLDER for p, t in zip(positions, seen.seen_ids)}


def test_the_masked_view_shows_kept_tokens_verbatim_and_hides_the_rest():
    observer = _observer(_node("a", MaskedView(tokens=16, keep=0.5)))
    seen = observer.observe("a", 40).seen_ids
    positions = range(24, 48)
    for position, token in zip(positions, seen.tolist()):
        assert token in (100 + position, PLACEHOLDER)
    n_kept = sum(token != PLACEHOLDER for token in seen.tolist())
    assert 0 < n_kept < len(seen)


def test_the_masked_view_hides_the_same_tokens_in_every_round():
    observer = _observer(_node("a", MaskedView(tokens=16, keep=0.5)))
    first = _mask_of(observer, "a", 40)
    later = _mask_of(observer, "a", 48)
    overlap = set(first) & set(later)
    assert len(overlap) == 16
    assert all(first[p] == later[p] for p in overlap)


def test_the_masked_view_never_hides_the_targets():
    observer = _observer(_node("a", MaskedView(tokens=16, keep=0.0)))
    seen = observer.observe("a", 40)
    assert seen.seen_ids.tolist() == [PLACEHOLDER] * 24
    assert _positions(observer.targets(40)) == list(range(40, 48))


def test_keep_one_shows_everything_and_keep_zero_nothing():
    observer = _observer(_node("all", MaskedView(tokens=16, keep=1.0)), _node("none", MaskedView(tokens=16, keep=0.0)))
    assert _positions(observer.observe("all", 40).seen_ids) == list(range(24, 48))
    assert set(observer.observe("none", 40).seen_ids.tolist()) == {PLACEHOLDER}


def test_the_mask_is_seeded_per_scenario_seed_and_node():
    view = MaskedView(tokens=60, keep=0.5)
    same = _observer(_node("a", view), seed=1).observe("a", 80).seen_ids
    again = _observer(_node("a", view), seed=1).observe("a", 80).seen_ids
    other_seed = _observer(_node("a", view), seed=2).observe("a", 80).seen_ids
    other_node = _observer(_node("b", view), seed=1).observe("b", 80).seen_ids
    assert torch.equal(same, again)
    assert not torch.equal(same, other_seed)
    assert not torch.equal(same, other_node)


def test_other_views_never_show_the_placeholder():
    observer = _observer(_node("a", WindowView(tokens=16)), _node("m", MaskedView(tokens=16, keep=0.0)))
    assert PLACEHOLDER not in observer.observe("a", 40).seen_ids.tolist()


def test_views_are_described_in_a_few_words():
    assert FullView().describe(256) == "full 256"
    assert FullView(tokens=64).describe(256) == "full 64"
    assert WindowView(tokens=16).describe(256) == "window 16"
    assert LaggedView(tokens=64, lag=32).describe(256) == "lagged 64 (lag 32)"
    assert MaskedView(tokens=8, keep=0.25).describe(256) == "masked 8 (keep 0.25)"
    assert NoView().describe(256) == "none"
