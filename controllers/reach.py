"""k-epsilon reachability (Magic Words, arXiv 2310.04444) and the authors' control game.

Reachability, as a library for `collective reach`:

1. `draw_pairs` cuts (x0, y) pairs from a token stream: x0 a window of 8 to 32 tokens, y the
   true next token, one of the model's top 75 next tokens, or a uniform random non-special
   token; every draw comes from one seeded `torch.Generator`.
2. `run_reach` runs the back-off ladder on each pair (`reach_pair`: prompt u placed before
   x0; reached when y is the argmax next token after [u][x0]) within a budget per pair, and
   appends one CSV row per pair as it finishes (an interrupted run keeps its rows; `resume`
   skips them). A pair whose budget ran out is "not reached within the budget", not "not reached".
3. `summarize` turns rows into the fraction reached at each k and the pairs the budget cut
   short at or below k, beside the paper's numbers; `format_summary` renders it in markdown.

`play_game` finds the shortest prompt u such that the greedy continuation of [u][text]
starts with a target string.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.filters import model_token_mask, special_token_ids
from controllers.gcg import GCGConfig, Progress
from controllers.objectives import (
    ControllerError,
    SequenceObjective,
    default_prefix_ids,
    encode,
    input_embedding,
    target_objective,
)
from controllers.search import DEFAULT_KS, Attempt, BackoffConfig, GreedyConfig, Method

logger = logging.getLogger(__name__)

TargetKind = Literal["true", "top75", "random"]
TOP_N = 75
DEFAULT_PAIR_BUDGET_S = 120.0  # one hard pair took 19 minutes at k = 10 on 2 CPU cores without one


@dataclass(frozen=True)
class PublishedPoint:
    """A number from the paper: the fraction of pairs reached with at most k prompt tokens."""

    model: str
    targets: TargetKind
    k: int
    low: float
    high: float

    def render(self) -> str:
        if self.low == self.high:
            return f"{self.model} {100 * self.low:.1f}%"
        return f"{self.model} {100 * self.low:.0f}-{100 * self.high:.0f}%"


PUBLISHED: tuple[PublishedPoint, ...] = (
    PublishedPoint("Falcon-7B", "true", 10, 0.972, 0.972),
    PublishedPoint("Llama-7B", "true", 10, 0.986, 0.986),
    PublishedPoint("GPT-2 small", "true", 10, 0.997, 0.997),
    PublishedPoint("Falcon-7B, Llama-7B, GPT-2 small", "top75", 10, 0.85, 0.89),
    PublishedPoint("Falcon-7B", "random", 10, 0.46, 0.46),
)


class ReachConfig(BackoffConfig):
    """Settings of a reachability run: the back-off ladder run on each pair (its GCG without
    the re-tokenization filter) with a budget per pair, and the x0 window lengths."""

    gcg: GCGConfig = GCGConfig(num_steps=100, search_width=64, topk=64, filter_retokenize=False)
    budget_s: float | None = Field(default=DEFAULT_PAIR_BUDGET_S, ge=0, description="wall seconds per pair; None: no limit")
    min_x0_tokens: int = Field(default=8, ge=1)
    max_x0_tokens: int = Field(default=32, ge=1)


@dataclass(frozen=True)
class ReachPair:
    """One (x0, y) pair and how the model ranks y after x0 with no prompt (rank 0 = argmax)."""

    index: int
    targets: TargetKind
    x0_ids: list[int]
    y_id: int
    base_rank: int
    base_loss: float


@dataclass(frozen=True)
class ReachRow:
    """One CSV row: a pair and the outcome of its back-off search."""

    pair: int
    targets: str
    x0_text: str
    x0_ids: str  # space-separated ids
    y_id: int
    y_text: str
    base_rank: int
    base_loss: float
    method: str
    k: int  # length of prompt_ids
    reached: bool
    loss: float
    prompt_ids: str  # space-separated ids
    prompt_text: str
    wall_time_s: float
    out_of_budget_k: int | None = None  # not reached: the length being searched when the budget ran out

    @property
    def outcome(self) -> str:
        """'reached', 'not reached within the budget' or 'not reached'."""
        if self.reached:
            return "reached"
        return "not reached" if self.out_of_budget_k is None else "not reached within the budget"

    @classmethod
    def from_csv(cls, record: dict[str, str]) -> ReachRow:
        values: dict[str, object] = dict(record)
        values.update({name: int(record[name]) for name in ("pair", "y_id", "base_rank", "k")})
        values.update({name: float(record[name]) for name in ("base_loss", "loss", "wall_time_s")})
        values["reached"] = record["reached"] == "True"
        values["out_of_budget_k"] = int(record["out_of_budget_k"]) if record["out_of_budget_k"] else None
        return cls(**values)  # type: ignore[arg-type]


CSV_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ReachRow))


@dataclass(frozen=True)
class ReachSummary:
    """The fraction of pairs reached with at most k prompt tokens, for each k, and the pairs
    not reached with at most k tokens because the budget ran out at or below k."""

    targets: str
    n_pairs: int
    ks: tuple[int, ...]
    reached: dict[int, int]
    fraction: dict[int, float]
    published: tuple[PublishedPoint, ...]
    out_of_budget: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReachResult:
    rows: list[ReachRow]
    summary: ReachSummary
    csv_path: Path
    skipped: int = 0  # rows already in the CSV when resuming


def _ids_text(ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)


@torch.no_grad()
def next_token_log_probs(model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """Log-probs (V,) of the token after ids (T,)."""
    logits = model(
        input_ids=torch.tensor([list(ids)], device=model.device), logits_to_keep=1
    ).logits
    return F.log_softmax(logits[0, -1].float(), dim=-1)


def draw_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stream_ids: Sequence[int],
    n_pairs: int,
    targets: TargetKind,
    generator: torch.Generator,
    *,
    min_x0_tokens: int = 8,
    max_x0_tokens: int = 32,
    prefix_ids: Sequence[int] | None = None,
) -> list[ReachPair]:
    """Draw n_pairs (x0, y) pairs from a token stream (see the module docstring).

    x0 has a length uniform in [min_x0_tokens, max_x0_tokens] and a uniform start; y depends
    on `targets`. `prefix_ids` ([bos] by default when the tokenizer adds one) precedes x0 when
    ranking y.
    """
    if n_pairs < 1:
        raise ControllerError(f"pairs: need at least 1, got {n_pairs}")
    if not 1 <= min_x0_tokens <= max_x0_tokens:
        raise ControllerError(
            f"x0 tokens: need 1 <= min ({min_x0_tokens}) <= max ({max_x0_tokens})"
        )
    if len(stream_ids) < max_x0_tokens + 1:
        raise ControllerError(
            f"corpus: {len(stream_ids)} tokens, too short for x0 windows of {max_x0_tokens} tokens"
        )
    if targets not in ("true", "top75", "random"):
        raise ControllerError(f"targets: expected true, top75 or random, got {targets!r}")
    prefix = list(default_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids)
    weight, _ = input_embedding(model)
    vocab = weight.shape[0]
    special = special_token_ids(tokenizer)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), vocab)) if i not in special])
    pairs = []
    for index in range(n_pairs):
        length = int(torch.randint(min_x0_tokens, max_x0_tokens + 1, (1,), generator=generator))
        start = int(torch.randint(0, len(stream_ids) - length, (1,), generator=generator))
        x0 = [int(i) for i in stream_ids[start : start + length]]
        log_probs = next_token_log_probs(model, prefix + x0)  # (V,)
        if targets == "true":
            y = int(stream_ids[start + length])
        elif targets == "top75":
            top = log_probs.topk(TOP_N).indices
            y = int(top[int(torch.randint(0, TOP_N, (1,), generator=generator))])
        else:
            y = int(ordinary[int(torch.randint(0, len(ordinary), (1,), generator=generator))])
        rank = int((log_probs > log_probs[y]).sum())
        pairs.append(ReachPair(index, targets, x0, y, rank, float(-log_probs[y])))
    return pairs


def pair_objective(
    model: PreTrainedModel, pair: ReachPair, prefix_ids: Sequence[int]
) -> SequenceObjective:
    """NLL of y after [prefix][u][x0]; success = y is the argmax."""
    return SequenceObjective(model, prefix_ids, [*pair.x0_ids, pair.y_id], 1)


def _read_rows(path: Path) -> list[ReachRow]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:  # appending to other columns would garble the file
            raise ControllerError(
                f"resume: {path} has the columns of another version of reach.csv "
                f"({', '.join(reader.fieldnames or ())}); measure into a fresh --out"
            )
        return [ReachRow.from_csv(record) for record in reader]


def _rows_done(csv_path: Path, pairs: Sequence[ReachPair], resume: bool) -> dict[int, ReachRow]:
    """The rows an existing CSV already holds, by pair index, checked against the pairs."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return {}
    if not resume:
        raise ControllerError(f"out: {csv_path} exists; pass resume to continue it")
    by_index = {pair.index: pair for pair in pairs}
    done: dict[int, ReachRow] = {}
    for row in _read_rows(csv_path):
        pair = by_index.get(row.pair)
        if pair is None or row.x0_ids != _ids_text(pair.x0_ids) or row.y_id != pair.y_id:
            raise ControllerError(
                f"resume: {csv_path} row for pair {row.pair} does not match the pairs drawn "
                "now (different corpus, seed or target kind?)"
            )
        done[row.pair] = row
    return done


def reach_pair(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pair: ReachPair,
    prefix_ids: Sequence[int],
    config: ReachConfig,
    allowed: torch.Tensor,
) -> ReachRow:
    """The back-off search on one pair within the config's budget, as its CSV row."""
    started = time.perf_counter()
    found = config.search(
        model, tokenizer, pair_objective(model, pair, prefix_ids), allowed=allowed
    )
    return ReachRow(
        pair=pair.index,
        targets=pair.targets,
        x0_text=str(tokenizer.decode(pair.x0_ids)),
        x0_ids=_ids_text(pair.x0_ids),
        y_id=pair.y_id,
        y_text=str(tokenizer.decode([pair.y_id])),
        base_rank=pair.base_rank,
        base_loss=pair.base_loss,
        method=found.method,
        k=found.k,
        reached=found.reached,
        loss=found.loss,
        prompt_ids=_ids_text(found.ids),
        prompt_text=found.text,
        wall_time_s=time.perf_counter() - started,
        out_of_budget_k=found.out_of_budget_k,
    )


def run_reach(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[ReachPair],
    csv_path: Path,
    config: ReachConfig | None = None,
    *,
    resume: bool = False,
    prefix_ids: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> ReachResult:
    """Back-off search on every pair, one CSV row appended (and flushed) per finished pair.

    With `resume`, pairs whose row is already in the CSV are skipped; the CSV must have been
    written for the same pairs (checked on x0 and y). Without it an existing CSV is an error.
    """
    config = config or ReachConfig()
    csv_path = Path(csv_path)
    prefix = list(default_prefix_ids(tokenizer) if prefix_ids is None else prefix_ids)
    done = _rows_done(csv_path, pairs, resume)
    allowed = model_token_mask(model, tokenizer, config.gcg)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    skipped = len(done)
    with csv_path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
            handle.flush()
        for count, pair in enumerate(pairs, start=1):
            if pair.index not in done:
                row = reach_pair(model, tokenizer, pair, prefix, config, allowed)
                if row.out_of_budget_k is not None:
                    logger.info("pair %d: not reached within the budget (at k = %d)", pair.index, row.out_of_budget_k)
                writer.writerow(asdict(row))
                handle.flush()  # an interrupted run keeps every finished pair
                done[pair.index] = row
            if progress is not None:
                progress(count, len(pairs))
    rows = [done[pair.index] for pair in pairs]
    targets = pairs[0].targets if pairs else "true"
    return ReachResult(rows, summarize(rows, config.ks, targets), csv_path, skipped)


def summarize(rows: Sequence[ReachRow], ks: Sequence[int], targets: str) -> ReachSummary:
    """Fraction of rows reached with a prompt of at most k tokens, for each k in ks, and the
    rows the budget cut short at a length of at most k (not reached, and not searched to the
    end at that k)."""
    ks = tuple(sorted(set(ks)))
    reached = {k: sum(1 for row in rows if row.reached and row.k <= k) for k in ks}
    cut = [row.out_of_budget_k for row in rows if not row.reached and row.out_of_budget_k is not None]
    out_of_budget = {k: sum(1 for at in cut if at <= k) for k in ks}
    n = len(rows)
    fraction = {k: (reached[k] / n if n else 0.0) for k in ks}
    published = tuple(point for point in PUBLISHED if point.targets == targets)
    return ReachSummary(targets, n, ks, reached, fraction, published, out_of_budget)


def format_summary(summary: ReachSummary, model_name: str = "this model") -> str:
    """A markdown table of the fraction reached at each k, with the paper's numbers after it."""
    lines = [
        f"Reachability of {model_name}: {summary.n_pairs} pairs, targets = {summary.targets}",
        "",
        "| k | reached | fraction | not reached within the budget |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for k in summary.ks:
        cut = summary.out_of_budget.get(k, 0)
        lines.append(
            f"| {k} | {summary.reached[k]}/{summary.n_pairs} | {100 * summary.fraction[k]:.1f}% | {cut}/{summary.n_pairs} |"
        )
    if summary.published:
        points = ", ".join(point.render() for point in summary.published)
        lines += ["", f"Paper (Wikitext, k <= {summary.published[0].k}): {points}."]
    return "\n".join(lines)


@dataclass(frozen=True)
class GameResult:
    """The shortest control prompt found for the control game, and what the model then says."""

    text: str
    target: str
    reached: bool
    prompt_ids: list[int]
    prompt_text: str
    length_tokens: int
    length_chars: int
    loss: float
    method: Method
    continuation: str  # greedy continuation of [prompt][text]
    attempts: list[Attempt] = field(default_factory=list)


@torch.no_grad()
def greedy_continuation(model: PreTrainedModel, ids: Sequence[int], n_tokens: int) -> list[int]:
    """The n_tokens greedy next tokens after ids."""
    sequence = list(ids)
    out: list[int] = []
    for _ in range(n_tokens):
        token = int(next_token_log_probs(model, sequence).argmax())
        sequence.append(token)
        out.append(token)
    return out


def play_game(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    target: str,
    max_k: int = 10,
    *,
    ks: Sequence[int] | None = None,
    greedy: GreedyConfig | None = None,
    gcg: GCGConfig | None = None,
    greedy_max_k: int = 3,
) -> GameResult:
    """Find the shortest u (in tokens) such that the greedy continuation of [u][text] starts
    with `target` (every target token the argmax), trying lengths ks (default: the paper's
    0 1 2 3 4 6 8 10 up to max_k, and max_k)."""
    if max_k < 0:
        raise ControllerError(f"max_k: must be >= 0, got {max_k}")
    target_ids = encode(tokenizer, target)
    if not target_ids:
        raise ControllerError(f"target: {target!r} tokenizes to no tokens")
    if ks is None:
        ks = sorted({k for k in DEFAULT_KS if k <= max_k} | {max_k})
    ladder = BackoffConfig(
        ks=tuple(ks),
        greedy_max_k=greedy_max_k,
        greedy=greedy or GreedyConfig(),
        gcg=gcg or GCGConfig(),
    )
    found = ladder.search(model, tokenizer, target_objective(model, tokenizer, target, suffix=text))
    context = default_prefix_ids(tokenizer) + found.ids + encode(tokenizer, text)
    continuation = greedy_continuation(model, context, len(target_ids) + 4)
    return GameResult(
        text=text,
        target=target,
        reached=found.reached,
        prompt_ids=found.ids,
        prompt_text=found.text,
        length_tokens=found.k,
        length_chars=len(found.text),
        loss=found.loss,
        method=found.method,
        continuation=str(tokenizer.decode(continuation)),
        attempts=found.attempts,
    )
