"""The round book: every report row's per-round statistics, keyed by a typed row key."""

from __future__ import annotations

import math

import pytest
import torch

from collective.evaluate.book import RoundBook, RowKey, row_keys
from collective.evaluate.metrics import summarize
from collective.lm.predictions import predictions_from_logits
from collective.records import ROW_ORDER
from collective.run.node import NodeRoundResult
from collective.run.pools import pool_linear

T, V = 4, 10


def _preds(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return predictions_from_logits(torch.randn(1, T, V, generator=gen), TARGETS, top_k=3)


TARGETS = torch.tensor([1, 2, 3, 4])
TOKEN_BYTES = torch.tensor([1, 2, 1, 3])


def _result(node_id: str, seed: int, *, isolated: bool = True) -> NodeRoundResult:
    return NodeRoundResult(
        node_id=node_id, round_index=0, collective=_preds(seed), isolated=_preds(seed + 1) if isolated else None,
        plain=_preds(seed + 2), message_text=None, inbox_tokens=0,
    )


def _book_round(book: RoundBook, results: dict[str, NodeRoundResult | None]) -> None:
    pooled = pool_linear(_preds(50), torch.ones(1))
    book.add_round(results, silent=pooled, collective=pooled, reference=_preds(60), targets=TARGETS, token_bytes=TOKEN_BYTES)


def test_rows_are_each_nodes_member_rows_then_the_pooled_rows_of_every_kind():
    keys = row_keys(["a", "b"])
    assert keys[:3] == [RowKey("member_plain", "a"), RowKey("member_isolated", "a"), RowKey("member_collective", "a")]
    assert keys[-3:] == [RowKey("ensemble_silent"), RowKey("collective"), RowKey("reference")]
    assert {key.kind for key in keys} == set(ROW_ORDER) - {"yardstick"}  # only a run that asks for it has one
    assert row_keys(["a", "b"], yardstick=True) == [*keys, RowKey("yardstick")]
    assert RowKey("collective") == ("collective", None)  # a plain tuple finds a row too


def test_a_round_books_each_row_from_its_own_predictions():
    book = RoundBook(["a", "b"])
    a, b = _result("a", 0), _result("b", 10)
    _book_round(book, {"a": a, "b": b})
    _book_round(book, {"a": a, "b": b})
    stats = book.stats()
    assert list(stats) == row_keys(["a", "b"])
    assert all(row.n_rounds == 2 for row in stats.values())
    plain_b = summarize(stats[RowKey("member_plain", "b")])
    assert plain_b.nll == pytest.approx(float(-b.plain.target_logprob.mean()))  # type: ignore[union-attr]
    assert plain_b.n_tokens == 2 * T
    assert summarize(stats[RowKey("reference")]).nll == pytest.approx(float(-_preds(60).target_logprob.mean()))


def test_a_missing_node_or_row_is_booked_as_missing_not_scored():
    book = RoundBook(["a", "b"])
    _book_round(book, {"a": _result("a", 0, isolated=False), "b": None})
    stats = book.stats()
    for key in (RowKey("member_isolated", "a"), RowKey("member_plain", "b"), RowKey("member_collective", "b")):
        assert int(stats[key].n_tokens.sum()) == 0 and int(stats[key].n_missing.sum()) == T
        assert math.isnan(summarize(stats[key]).nll)
    assert int(stats[RowKey("member_plain", "a")].n_tokens.sum()) == T


def test_a_book_of_hand_made_rounds_keeps_their_order():
    book = RoundBook(["a"])
    _book_round(book, {"a": _result("a", 0)})
    rounds = {key: [stats] for key, stats in reversed(book.stats().items())}
    again = RoundBook.from_rounds(rounds)
    assert again.keys == list(reversed(row_keys(["a"])))
    assert again.node_ids == ["a"]
