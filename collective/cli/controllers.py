"""`collective reach` and `collective game`: the paper's measurements from the command line.

Thin: parse, load the model and corpus, call `controllers.reach`, render. reach writes
reach.csv (the library appends it pair by pair), summary.md and summary.json (a
`ReachSummaryRecord`) and reach.png into --out. torch and the controllers package are
imported only when a command runs, so that `collective --help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import Progress, TaskID

from collective.cli.common import (
    EXIT_USER_ERROR,
    add_threads_option,
    minutes,
    model_pool,
    print_error,
    progress_bar,
    set_threads,
)
from collective.scenario import CorpusSpec

if TYPE_CHECKING:
    import torch

    from collective.lm.models import LoadedModel
    from controllers import GreedyConfig, ReachConfig, ReachResult, ReachSummary

REACH_SUMMARY_SCHEMA_VERSION = 2  # 2: out_of_budget (the per-pair budget of issue 22)


class ReachSummaryRecord(BaseModel):
    """summary.json of `collective reach`: the model, the targets, the fraction of pairs
    reached with at most k prompt tokens and the number of pairs not reached within the
    budget at or below k, keyed by k as text (JSON object keys are strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = REACH_SUMMARY_SCHEMA_VERSION
    model: str
    targets: str
    n_pairs: int
    fraction: dict[str, float]
    out_of_budget: dict[str, int]
    command: str  # the command line that measured it (its budget too), to run it again

    @classmethod
    def of(cls, summary: ReachSummary, model: str, command: str) -> ReachSummaryRecord:
        fraction = {str(k): value for k, value in summary.fraction.items()}
        out_of_budget = {str(k): summary.out_of_budget.get(k, 0) for k in summary.ks}
        return cls(
            model=model, targets=summary.targets, n_pairs=summary.n_pairs, fraction=fraction,
            out_of_budget=out_of_budget, command=command,
        )

    def to_json(self) -> str:
        # json.dumps, not model_dump_json: the bytes stay those summary.json always had
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `reach` and `game` subcommands to the main parser's subparsers."""
    reach = sub.add_parser(
        "reach", help="k-epsilon reachability of a model (the Magic Words measurement)", description=cmd_reach.__doc__
    )
    _add_model_options(reach, model_help="alias, HF id, folder or .gguf (default smollm2-135m)")
    reach.add_argument("--corpus", default="wikitext2", help="builtin:pydoc, wikitext2, hf:ID, or a text file path")
    reach.add_argument("--corpus-path", help="file for wikitext2 (default: ../shared/data/... or Hugging Face)")
    reach.add_argument("--pairs", type=int, default=50)
    reach.add_argument("--targets", choices=["true", "top75", "random"], default="true")
    reach.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 10], help="prompt lengths to try")
    reach.add_argument("--seed", type=int, default=0)
    reach.add_argument("--gcg-steps", type=int, default=100)
    reach.add_argument("--search-width", type=int, default=64)
    reach.add_argument("--topk", type=int, default=64)
    reach.add_argument(
        "--greedy-candidates", type=int, default=256,
        help="greedy back-generation tries the N tokens with the best one-hot gradient (0: every token, as in the paper; slow on a CPU)",
    )
    reach.add_argument(
        "--pair-budget-s", type=budget_seconds, default=120.0, metavar="SECONDS",
        help="wall seconds per pair (default 120; inf: no limit), checked between greedy batches and GCG steps; "
        "a pair that runs out is 'not reached within the budget'",
    )
    reach.add_argument(
        "--pair-budget-steps", type=budget_steps, metavar="N",
        help="GCG steps per pair over all its prompt lengths (default: no limit beyond --gcg-steps per length)",
    )
    reach.add_argument("--out", required=True, help="output folder")
    reach.add_argument("--resume", action="store_true", help="continue the CSV in --out, skipping finished pairs")
    reach.set_defaults(func=cmd_reach)

    game = sub.add_parser("game", help="the control game: shortest prompt that makes the model continue TEXT with TARGET")
    game.add_argument("text", help='the text, e.g. "Roger Federer is the"')
    game.add_argument("--target", required=True, help='what the greedy continuation must start with, e.g. " greatest"')
    _add_model_options(game, model_help=None)
    game.add_argument("--max-k", type=int, default=10)
    game.add_argument("--gcg-steps", type=int, default=100)
    game.add_argument("--search-width", type=int, default=64)
    game.add_argument("--greedy-candidates", type=int, default=0, help="0: every token (default)")
    game.add_argument("--json", action="store_true", help="print the result as JSON")
    game.set_defaults(func=cmd_game)


def budget_seconds(text: str) -> float:
    """argparse type of --pair-budget-s: seconds >= 0, or inf for no limit."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 or inf, got {text!r}")
    return value


def budget_steps(text: str) -> int:
    """argparse type of --pair-budget-steps: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of GCG steps >= 0, got {text!r}")
    return int(text)


def _add_model_options(parser: argparse.ArgumentParser, *, model_help: str | None) -> None:
    """--model, --dtype, --device and --threads: which model to load and where it runs."""
    parser.add_argument("--model", default="smollm2-135m", help=model_help)
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument("--device", default="auto")
    add_threads_option(parser)


def _load(args: argparse.Namespace) -> LoadedModel:
    set_threads(args.threads)
    return model_pool(args).get(args.model, device=args.device, dtype=args.dtype)


def _greedy(candidates: int) -> GreedyConfig:
    from controllers import GreedyConfig

    return GreedyConfig(candidates=candidates or None)


# ---------------------------------------------------------------------------- reach


def cmd_reach(args: argparse.Namespace, console: Console) -> int:
    """Draw (x0, y) pairs from a corpus and find the shortest control prompt u (|u| <= k, placed
    before x0) that makes y the argmax next token: greedy back-generation for k <= 3, GCG above,
    stopping at the first success or when the pair's budget runs out ("not reached within the
    budget", counted per k apart from "not reached"). Writes reach.csv (one row per pair,
    appended as pairs finish) and summary.md/summary.json with the paper's numbers beside ours."""
    from controllers import format_summary
    from controllers.objectives import ControllerError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {args.model} and the corpus ..."):
        loaded = _load(args)
        stream = _token_stream(corpus_spec(args.corpus, args.corpus_path), loaded, args.pairs)
    try:
        result = _measure(args, loaded, stream, out / "reach.csv", console)
    except ControllerError as exc:
        print_error(console, str(exc))
        return EXIT_USER_ERROR
    table = format_summary(result.summary, loaded.name)
    command = _reach_command(args)
    (out / "summary.md").write_text(table + f"\n\nCommand: `{command}`\n", encoding="utf-8")
    (out / "summary.json").write_text(ReachSummaryRecord.of(result.summary, loaded.name, command).to_json(), encoding="utf-8")
    _plot(result, out / "reach.png", loaded.name, console)
    console.print(table, highlight=False)
    console.print(f"wrote {out}/reach.csv, summary.md, summary.json")
    return 0


def corpus_spec(corpus: str, corpus_path: str | None) -> CorpusSpec:
    """--corpus as a scenario's corpus: a source the scenario knows (builtin:pydoc, wikitext2,
    hf:...), checked by `CorpusSpec` itself, and anything else a text file."""
    from pydantic import ValidationError

    try:
        return CorpusSpec(source=corpus, path=Path(corpus_path) if corpus_path else None)
    except ValidationError:
        return CorpusSpec(source="file", path=Path(corpus))


def _token_stream(spec: CorpusSpec, loaded: LoadedModel, n_pairs: int) -> torch.Tensor:
    """The corpus as token ids (L,): enough for n_pairs draws, or all of a small corpus."""
    import torch

    from collective.lm.corpus import CorpusTooSmallError, load_corpus_text, tokenize_stream

    text = load_corpus_text(spec.source, spec.path, base_dir=Path.cwd())
    try:
        return tokenize_stream(text, loaded.tokenizer, min(200_000, max(4096, 64 * n_pairs)))
    except CorpusTooSmallError:  # a small corpus: all of it (drawing pairs says if even that is too short)
        ids = loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)


def _reach_config(args: argparse.Namespace) -> ReachConfig:
    from controllers import GCGConfig, ReachConfig

    return ReachConfig(
        ks=tuple(args.k),
        greedy=_greedy(args.greedy_candidates),
        gcg=GCGConfig(num_steps=args.gcg_steps, search_width=args.search_width, topk=args.topk, filter_retokenize=False),
        budget_s=None if args.pair_budget_s == float("inf") else args.pair_budget_s,
        budget_gcg_steps=args.pair_budget_steps,
    )


def _measure(
    args: argparse.Namespace, loaded: LoadedModel, stream: torch.Tensor, csv_path: Path, console: Console
) -> ReachResult:
    """Draw the pairs and search each, with a progress bar (or plain lines off a terminal)."""
    import torch

    from controllers import draw_pairs, run_reach

    config = _reach_config(args)
    with console.status("drawing pairs ..."):
        pairs = draw_pairs(
            loaded.model, loaded.tokenizer, stream.tolist(), args.pairs, args.targets,
            torch.Generator().manual_seed(args.seed),
        )
    with progress_bar(console, "pairs") as progress:
        tick = _pair_ticker(progress, progress.add_task("pairs", total=len(pairs)), console)
        return run_reach(loaded.model, loaded.tokenizer, pairs, csv_path, config, resume=args.resume, progress=tick)


def _pair_ticker(progress: Progress, task: TaskID, console: Console) -> Callable[[int, int], None]:
    """The reach progress callback: the bar, and off a terminal one line per pair with the time left."""
    plain = not console.is_terminal  # no bar off a terminal: one line per pair instead
    began = time.perf_counter()
    skipped: int | None = None  # pairs already in the CSV (--resume) are ticked first

    def tick(done: int, total: int) -> None:
        nonlocal skipped
        progress.update(task, completed=done, total=total)
        if plain:
            if skipped is None:
                skipped = done - 1
            elapsed = time.perf_counter() - began
            rate = elapsed / max(1, done - skipped)
            left = f", about {minutes(rate * (total - done))} left" if done < total else ""
            console.print(f"pairs {done}/{total} ({minutes(elapsed)}{left})", highlight=False)

    return tick


def _reach_command(args: argparse.Namespace) -> str:
    """The command line that repeats this measurement, for summary.md and summary.json."""
    return (
        f"collective reach --model {args.model} --corpus {args.corpus} --pairs {args.pairs} --targets {args.targets} "
        f"--k {' '.join(map(str, args.k))} --seed {args.seed} --gcg-steps {args.gcg_steps} "
        f"--search-width {args.search_width} --topk {args.topk} --greedy-candidates {args.greedy_candidates} "
        f"--pair-budget-s {args.pair_budget_s:g}"
        + (f" --pair-budget-steps {args.pair_budget_steps}" if args.pair_budget_steps is not None else "")
        + f" --dtype {args.dtype} --out {args.out}"
    )


def _plot(result: ReachResult, path: Path, model_name: str, console: Console) -> None:
    """reach.png, the fraction reached against k; a failure is a warning line, not an error."""
    try:
        from collective.report.plots import plot_reach

        plot_reach([result.summary], path, title=f"{model_name}: reachability")
    except Exception as exc:  # a plot must never cost the measurement
        print_error(console, f"no plot: {exc}", label="warning:", style="yellow")


# ---------------------------------------------------------------------------- game


def cmd_game(args: argparse.Namespace, console: Console) -> int:
    from controllers import GCGConfig, play_game
    from controllers.objectives import ControllerError

    with console.status(f"loading {args.model} ..."):
        loaded = _load(args)
    try:
        with console.status("searching ..."):
            result = play_game(
                loaded.model, loaded.tokenizer, args.text, args.target, args.max_k,
                greedy=_greedy(args.greedy_candidates),
                gcg=GCGConfig(num_steps=args.gcg_steps, search_width=args.search_width),
            )
    except ControllerError as exc:
        print_error(console, str(exc))
        return EXIT_USER_ERROR
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "text": result.text, "target": result.target, "reached": result.reached,
                    "prompt_text": result.prompt_text, "prompt_ids": result.prompt_ids,
                    "length_tokens": result.length_tokens, "length_chars": result.length_chars,
                    "loss": result.loss, "method": result.method, "continuation": result.continuation,
                }
            )
        )
    elif result.reached:
        console.print(
            f"reached with {result.length_tokens} tokens ({result.length_chars} characters, {result.method}): "
            f"{result.prompt_text!r}\ncontinuation of [prompt]{result.text!r}: {result.continuation!r}",
            highlight=False,
        )
    else:
        console.print(
            f"[yellow]not reached[/] with up to {args.max_k} tokens; best loss {result.loss:.3f} with "
            f"{result.prompt_text!r} (continuation {result.continuation!r})",
            highlight=False,
        )
    return 0 if result.reached else 1
