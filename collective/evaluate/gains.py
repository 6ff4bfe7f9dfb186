"""The headline numbers and the one-line verdict.

`gains` picks the best isolated member (among the members scored on every eval round),
then asks `intervals.paired_intervals` for every row's CI and the paired
differences: collective gain = NLL(best member) - NLL(collective), communication gain =
NLL(silent ensemble) - NLL(collective), and for each member with a control prompt its
controller gain = NLL(member plain) - NLL(member isolated) (> 0: the prompt helps its node
alone), each on the rounds its two sides share. `verdict` turns the first two into one
honest sentence, `controller_effect` a controller gain into words; gains within
`TIE_NATS` of zero (float rounding of the scores, e.g. a collective of identical members)
read as not distinguishable, never as a win or a loss. Below `intervals.MIN_ROUNDS` rounds
no interval holds its level: the gains have none, and the verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic

from collective.evaluate.intervals import (
    MIN_ROUNDS,
    TOO_FEW_ROUNDS,
    GapShare,
    PairedIntervals,
    paired_intervals,
)
from collective.evaluate.metrics import LN2, Estimate, RoundStats, Row, summarize
from collective.records import Unit

TIE_NATS = 1e-5  # |gain| and CI within this many nats/token of 0: float rounding, not a difference

RULE_COMPLETE = "lowest NLL among the isolated members scored on every eval round"
RULE_ANY = "no isolated member was scored on every eval round: lowest NLL among those scored on any"
RULE_NONE = "no isolated member was scored: no best member"


@dataclass(frozen=True)
class Gains(Generic[Row]):
    """The headline numbers, nats/token, each with a paired CI.

    collective_gain: NLL(best isolated member) - NLL(collective); > 0: the collective wins.
    communication_gain: NLL(silent ensemble) - NLL(collective); > 0: messages helped.
    Each `Estimate.n_rounds` is the rounds its two sides share.
    best_member: the isolated row chosen by `best_member_rule` (None: no member was scored).
    intervals: every row's CI and every gain's (one call of `paired_intervals`).
    controller_gains: per prompted member's isolated row, NLL(its plain row) - NLL(it); > 0:
    its control prompt helps it.
    """

    collective_gain: Estimate
    communication_gain: Estimate
    best_member: Row | None
    best_member_rule: str
    intervals: PairedIntervals[Row]
    controller_gains: dict[Row, Estimate] = field(default_factory=dict)


def choose_best_member(rows: Mapping[Row, RoundStats], isolated: Sequence[Row]) -> tuple[Row | None, str]:
    """The isolated row with the lowest NLL among those scored on every round (else among
    those scored on any), and the rule used. A member with no score (NaN) is never chosen.

    Picking on the eval data itself favours the member (its NLL is the minimum of several
    noisy values), so the collective gain is, if anything, understated."""
    nll = {name: summarize(rows[name]).nll for name in isolated}
    complete = [name for name in isolated if rows[name].complete]
    if complete:
        return min(complete, key=nll.__getitem__), RULE_COMPLETE
    scored = [name for name in isolated if math.isfinite(nll[name])]
    if scored:
        return min(scored, key=nll.__getitem__), RULE_ANY
    return None, RULE_NONE


def gains(
    rows: Mapping[Row, RoundStats], *, isolated: Sequence[Row], silent: Row, collective: Row,
    confidence: float = 0.95, controlled: Sequence[tuple[Row, Row]] = (),
) -> Gains[Row]:
    """Collective, communication and controller gains, and every row's CI (paired intervals
    over rounds, `intervals.py`).

    rows: row -> RoundStats over the same rounds; isolated: the isolated member rows;
    silent, collective: those rows; controlled: (plain row, isolated row) of each member
    with a control prompt.
    """
    if not isolated:
        raise ValueError("gains needs at least one isolated member row")
    chosen = choose_best_member(rows, isolated)
    best, rule = chosen
    differences = [(silent, collective)] + ([] if best is None else [(best, collective)]) + list(controlled)
    result = paired_intervals(rows, differences=differences, confidence=confidence)
    none = Estimate(math.nan, math.nan, math.nan, confidence, 0)
    return Gains(
        collective_gain=none if best is None else result.differences[(best, collective)],
        communication_gain=result.differences[(silent, collective)],
        best_member=best,
        best_member_rule=rule,
        intervals=result,
        controller_gains={prompted: result.differences[(plain, prompted)] for plain, prompted in controlled},
    )


# ---------------------------------------------------------------------------- verdict


def signed(value: float) -> str:
    """`+0.123`; a value that rounds to zero is `+0.000`, never `-0.000`."""
    text = f"{value:+.3f}"
    return "+0.000" if text == "-0.000" else text


def _ci_text(estimate: Estimate) -> str:
    level = f"{estimate.confidence:.0%} CI"
    if not estimate.has_interval:
        rounds = "" if estimate.n_rounds is None else f" ({estimate.n_rounds} rounds; it needs {MIN_ROUNDS})"
        return f"no {level}: {TOO_FEW_ROUNDS}{rounds}"
    return f"{level} {signed(estimate.low)} to {signed(estimate.high)}"


def direction(estimate: Estimate) -> int:
    """+1: the CI lies above zero by more than TIE_NATS; -1: below; 0: not distinguishable
    (the CI straddles zero, sits within float tolerance of it, or there is no CI)."""
    if not estimate.has_interval:
        return 0
    if estimate.low > TIE_NATS:
        return 1
    return -1 if estimate.high < -TIE_NATS else 0


def _tie(estimate: Estimate) -> bool:
    """Equal within float tolerance: the value and any CI within TIE_NATS of 0."""
    inside = abs(estimate.value) <= TIE_NATS
    return inside and (not estimate.has_interval or max(abs(estimate.low), abs(estimate.high)) <= TIE_NATS)


def in_bits(estimate: Estimate) -> Estimate:
    """The same estimate in bits (nats / ln 2): a byte-unit gain read in bits/byte."""
    return replace(estimate, value=estimate.value / LN2, low=estimate.low / LN2, high=estimate.high / LN2)


def verdict(
    collective_gain: Estimate, communication_gain: Estimate, best_member: str | None = None, note: str = "",
    unit: Unit = "token",
) -> str:
    """One honest line: does the collective beat its best member, did communication matter.

    A gain whose CI lies entirely above +TIE_NATS is a win, entirely below -TIE_NATS a
    loss, otherwise not distinguishable (also when there is no CI). The gains come in nats
    per `unit`; the sentence gives them in nats/token, or for a byte-unit run (several
    tokenizers) in bits/byte, decided on the nats. `note` (e.g. on missed rounds) is
    appended as its own sentence.
    """
    best = "its best member" if best_member is None else f"its best member ({best_member})"
    per = "bits/byte" if unit == "byte" else "nats/token"
    shown = in_bits if unit == "byte" else (lambda estimate: estimate)
    g, c = shown(collective_gain), shown(communication_gain)
    tie = ": equal within float tolerance" if _tie(collective_gain) else ""
    first = {
        1: f"The collective beats {best} by {g.value:.3f} {per} ({_ci_text(g)})",
        -1: f"The collective is worse than {best} by {-g.value:.3f} {per} ({_ci_text(g)})",
        0: f"The collective is not distinguishable from {best}{tie} (gain {signed(g.value)} {per}, {_ci_text(g)})",
    }[direction(collective_gain)]
    tie = ", equal within float tolerance" if _tie(communication_gain) else ""
    second = {
        1: f"communication mattered: {c.value:.3f} {per} better than the silent ensemble ({_ci_text(c)})",
        -1: f"communication hurt: {-c.value:.3f} {per} worse than the silent ensemble ({_ci_text(c)})",
        0: f"communication made no measurable difference over the silent ensemble{tie} "
        f"(gain {signed(c.value)} {per}, {_ci_text(c)})",
    }[direction(communication_gain)]
    return f"{first}; {second}." + (f" {note}" if note else "")


def yardstick_line(gap: GapShare, yardstick: str) -> str:
    """The yardstick sentence: the share of the gap between the best member and the yardstick
    (bits/byte) the collective closes, with its CI, or why it is undefined."""
    size = f"gap {gap.gap.value:.3f} bits/byte, {_ci_text(gap.gap)}"
    if not gap.defined:
        return (
            f"The share of the gap to the yardstick ({yardstick}) that the collective closes is undefined: the yardstick "
            f"is not measurably better than its best member in bits/byte ({size})."
        )
    share = gap.share
    if share.has_interval:
        interval = f"{share.confidence:.0%} CI {100 * share.low:.0f}% to {100 * share.high:.0f}%"
    else:
        interval = _ci_text(share)
    return (
        f"The collective closes {100 * share.value:.0f}% of the gap between its best member and the yardstick "
        f"({yardstick}) ({interval}; {size})."
    )


def controller_effect(estimate: Estimate) -> str:
    """A controller gain in words, read like the verdict's gains (TIE_NATS, the CI)."""
    return {
        1: "the prompt helps its node",
        -1: "the prompt hurts its node",
        0: "no measurable effect" + (", equal within float tolerance" if _tie(estimate) else ""),
    }[direction(estimate)]


def missed_rounds_note(
    missed: Mapping[str, int], n_rounds: int, collective_gain: Estimate, communication_gain: Estimate, rule: str
) -> str:
    """The verdict's sentence on members that missed eval rounds ('' when none did)."""
    missed = {node_id: count for node_id, count in missed.items() if count}
    if not missed:
        return ""
    who = ", ".join(f"{node_id} {count} of {n_rounds}" for node_id, count in missed.items())

    def rounds(estimate: Estimate) -> str:
        return "no rounds" if estimate.n_rounds is None else f"{estimate.n_rounds} of {n_rounds} rounds"

    chosen = "the best member is chosen among the members scored on every round" if rule == RULE_COMPLETE else rule
    return (
        f"Missed eval rounds: {who}; each gain pairs the rounds both its sides were scored on "
        f"(collective gain: {rounds(collective_gain)}, communication gain: {rounds(communication_gain)}), "
        f"and {chosen}."
    )


__all__ = [
    "Gains",
    "TIE_NATS",
    "choose_best_member",
    "controller_effect",
    "direction",
    "gains",
    "in_bits",
    "missed_rounds_note",
    "signed",
    "verdict",
    "yardstick_line",
]
