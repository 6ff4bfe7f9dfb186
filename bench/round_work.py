"""The scoring work of bench/rounds.py: the sequences the fair baseline scored, their distinct
ones, and the padding that the batched engine's passes pay on them (one pass per kind of row,
or bucketed by length as `collective.lm.scoring._chunks` does)."""

from __future__ import annotations

from collective.lm.scoring import ScoreItem, _chunks


def distinct(work: list[ScoreItem]) -> list[ScoreItem]:
    """The sequences of `work` that differ (input ids or targets), first occurrence kept."""
    seen: dict[tuple[tuple[int, ...], tuple[int, ...]], ScoreItem] = {}
    for item in work:
        seen.setdefault((tuple(item.input_ids().tolist()), tuple(item.targets.tolist())), item)
    return list(seen.values())


def padded_share(work: list[ScoreItem]) -> float:
    """The share of a left-padded batch of `work` that is padding."""
    lengths = [len(item.input_ids()) for item in work]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def engine_padding(work: list[ScoreItem], n_rounds: int, n_nodes: int) -> tuple[float, float]:
    """The padding share of the batched engine's scoring passes over the fair baseline's `work`
    (per round: each node's collective, isolated and plain rows, then the reference): with one
    left-padded pass per kind of row (distinct rows without the bus; speakers' rows), and
    with the passes `scoring._chunks` buckets them into. Returns (one pass, bucketed)."""
    real = padded_one = padded_bucketed = 0
    for r in range(n_rounds):
        rows = work[r * (3 * n_nodes + 1) : (r + 1) * (3 * n_nodes + 1)]
        without_bus = distinct([item for i, item in enumerate(rows[:-1]) if i % 3])
        for kind in (without_bus, rows[: 3 * n_nodes : 3], rows[-1:]):
            lengths = [len(item.input_ids()) for item in kind]
            real += sum(lengths)
            padded_one += max(lengths) * len(lengths)
            padded_bucketed += sum(max(lengths[i] for i in g) * len(g) for g in _chunks(lengths, 8192))
    return 1 - real / padded_one, 1 - real / padded_bucketed
