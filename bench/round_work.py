"""The scoring work of bench/rounds.py: the sequences the fair baseline scored, their distinct
ones, the padding that the batched engine's passes pay on them (one pass per kind of row,
or bucketed by length as `collective.lm.scoring._chunks` does), and the machine's limits for
that work (one forward pass over the same tokens, nothing else)."""

from __future__ import annotations

import time

import torch

from collective.lm.scoring import ScoreItem, _chunks, left_pad

EVERY, DISTINCT, WITH_MESSAGES = "limit, every row", "limit, distinct rows", "limit, distinct rows + messages"


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


@torch.no_grad()
def limit_pass(model: torch.nn.Module, work: list[ScoreItem], pad_id: int, by_length: bool = False) -> tuple[float, float]:
    """(wall, cpu) seconds of scoring every sequence in `work`: one forward over all of them in
    one left-padded batch, or (`by_length`) one forward per group of equal length, no padding."""
    groups: dict[int, list[torch.Tensor]] = {}
    for item in work:
        groups.setdefault(len(item.input_ids()) if by_length else 0, []).append(item.input_ids())
    batches = [left_pad(rows, pad_id) for rows in groups.values()]  # ids, mask, positions (b, L) each
    wall, cpu = time.perf_counter(), time.process_time()
    for ids, mask, positions in batches:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=len(work[0].targets), use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def with_messages(scored: list[ScoreItem], spoken: list[tuple[int, torch.Tensor, int]], n_rounds: int) -> tuple[list[ScoreItem], int]:
    """The work of `n_rounds` rounds with their messages, for the limit that includes them: the distinct
    rows, each speaker's collective row replaced by its message prompt ([context][round][speak
    prompt], one sequence: the engine scores the row and feeds the speak prompt onto its cache),
    a row whose sequence begins a prompt left out (the prompt's pass computes it: a speaker with
    an empty inbox reads its isolated row), and the decode steps, per round those of its longest
    message (each step reads every weight once)."""
    work = list(scored)
    for index, prompt, _ in spoken:
        item = work[index]
        keep = len(item.targets) - 1  # the prompt's last R - 1 tokens stand where the round's were
        work[index] = ScoreItem(prompt[: len(prompt) - keep], torch.cat([prompt[len(prompt) - keep :], prompt[-1:]]), item.targets)
    per_round = len(scored) // n_rounds
    longest: dict[int, int] = {}
    for index, _, new in spoken:
        longest[index // per_round] = max(longest.get(index // per_round, 0), new)
    prompts = [tuple(prompt.tolist()) for _, prompt, _ in spoken]
    kept = [item for item in distinct(work) if not _begins_a_prompt(tuple(item.input_ids().tolist()), prompts)]
    return kept, sum(longest.values())


def _begins_a_prompt(ids: tuple[int, ...], prompts: list[tuple[int, ...]]) -> bool:
    """Whether `ids` is a strict beginning of one of `prompts`."""
    return any(len(ids) < len(prompt) and prompt[: len(ids)] == ids for prompt in prompts)


def read_weights(model: torch.nn.Module) -> tuple[float, float]:
    """(wall, cpu) seconds of reading every weight of the model once (a sum over each): the
    bound of a decode step, which multiplies a few rows by every weight."""
    wall, cpu = time.perf_counter(), time.process_time()
    for parameter in model.parameters():
        parameter.sum()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_limits(model: torch.nn.Module, scored: list[ScoreItem], spoken: list[tuple[int, torch.Tensor, int]],
                n_rounds: int, pad_id: int, limits: dict[str, list[tuple[float, float]]]) -> tuple[dict[str, list[ScoreItem]], int]:
    """Time each limit once over the fair baseline's work, its sequences `scored` and its
    messages `spoken` (appended to `limits`). Returns the work of the two scoring limits and
    the decode steps of the limit with messages."""
    work = {EVERY: scored, DISTINCT: distinct(scored)}
    for name, items in work.items():
        limits[name].append(limit_pass(model, items, pad_id, by_length=name == DISTINCT))
    items, steps = with_messages(scored, spoken, n_rounds)
    wall, cpu = limit_pass(model, items, pad_id, by_length=True)
    for _ in range(steps):
        step_wall, step_cpu = read_weights(model)
        wall, cpu = wall + step_wall, cpu + step_cpu
    limits[WITH_MESSAGES].append((wall, cpu))
    return work, steps
