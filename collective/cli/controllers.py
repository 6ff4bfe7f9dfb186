"""`collective reach` and `collective game`: the paper's measurements from the command line.

Thin: parse, load the model and corpus, call `controllers.reach`, render.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from collective.cli import THREADS_HELP, threads_arg

    reach = sub.add_parser(
        "reach",
        help="k-epsilon reachability of a model (the Magic Words measurement)",
        description="Draw (x0, y) pairs from a corpus and find the shortest control prompt u (|u| <= k, "
        "placed before x0) that makes y the argmax next token: greedy back-generation for k <= 3, GCG "
        "above, stopping at the first success. Writes reach.csv (one row per pair, appended as pairs "
        "finish) and summary.md/summary.json with the paper's numbers beside ours.",
    )
    reach.add_argument("--model", default="smollm2-135m", help="alias, HF id, folder or .gguf (default smollm2-135m)")
    reach.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    reach.add_argument("--device", default="auto")
    reach.add_argument("--threads", type=threads_arg, metavar="N", help=THREADS_HELP)
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
    reach.add_argument("--out", required=True, help="output folder")
    reach.add_argument("--resume", action="store_true", help="continue the CSV in --out, skipping finished pairs")
    reach.set_defaults(func=cmd_reach)

    game = sub.add_parser(
        "game",
        help="the control game: shortest prompt that makes the model continue TEXT with TARGET",
    )
    game.add_argument("text", help='the text, e.g. "Roger Federer is the"')
    game.add_argument("--target", required=True, help='what the greedy continuation must start with, e.g. " greatest"')
    game.add_argument("--model", default="smollm2-135m")
    game.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    game.add_argument("--device", default="auto")
    game.add_argument("--threads", type=threads_arg, metavar="N", help=THREADS_HELP)
    game.add_argument("--max-k", type=int, default=10)
    game.add_argument("--gcg-steps", type=int, default=100)
    game.add_argument("--search-width", type=int, default=64)
    game.add_argument("--greedy-candidates", type=int, default=0, help="0: every token (default)")
    game.add_argument("--json", action="store_true", help="print the result as JSON")
    game.set_defaults(func=cmd_game)


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from collective.cli import _pool, set_threads

    set_threads(args.threads)
    return _pool(args).get(args.model, device=args.device, dtype=args.dtype)


def _greedy(candidates: int):  # type: ignore[no-untyped-def]
    from controllers import GreedyConfig

    return GreedyConfig(candidates=candidates or None)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def cmd_reach(args: argparse.Namespace, console: Console) -> int:
    import torch

    from collective.lm.corpus import CorpusTooSmallError, load_corpus_text, tokenize_stream
    from controllers import GCGConfig, ReachConfig, draw_pairs, format_summary, run_reach
    from controllers.objectives import ControllerError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with console.status(f"loading {args.model} and the corpus ..."):
        loaded = _load(args)
        source, path = args.corpus, args.corpus_path
        if source not in ("builtin:pydoc", "wikitext2") and not source.startswith("hf:"):
            source, path = "file", source
        text = load_corpus_text(source, Path(path) if path else None, base_dir=Path.cwd())
        try:
            stream = tokenize_stream(text, loaded.tokenizer, min(200_000, max(4096, 64 * args.pairs)))
        except CorpusTooSmallError:  # a small corpus: all of it (drawing pairs says if even that is too short)
            ids = loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            stream = torch.tensor(ids, dtype=torch.long)
    config = ReachConfig(
        ks=tuple(args.k),
        greedy=_greedy(args.greedy_candidates),
        gcg=GCGConfig(num_steps=args.gcg_steps, search_width=args.search_width, topk=args.topk, filter_retokenize=False),
    )
    try:
        with console.status("drawing pairs ..."):
            pairs = draw_pairs(
                loaded.model, loaded.tokenizer, stream.tolist(), args.pairs, args.targets,
                torch.Generator().manual_seed(args.seed),
            )
        with Progress(
            TextColumn("[bold]pairs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, transient=True,
        ) as progress:
            task = progress.add_task("pairs", total=len(pairs))

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
                    left = f", about {_minutes(rate * (total - done))} left" if done < total else ""
                    console.print(f"pairs {done}/{total} ({_minutes(elapsed)}{left})", highlight=False)

            result = run_reach(
                loaded.model, loaded.tokenizer, pairs, out / "reach.csv", config, resume=args.resume, progress=tick
            )
    except ControllerError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    table = format_summary(result.summary, loaded.name)
    command = (
        f"collective reach --model {args.model} --corpus {args.corpus} --pairs {args.pairs} --targets {args.targets} "
        f"--k {' '.join(map(str, args.k))} --seed {args.seed} --gcg-steps {args.gcg_steps} "
        f"--search-width {args.search_width} --topk {args.topk} --greedy-candidates {args.greedy_candidates} "
        f"--dtype {args.dtype} --out {args.out}"
    )
    (out / "summary.md").write_text(table + f"\n\nCommand: `{command}`\n", encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "model": loaded.name,
                "targets": result.summary.targets,
                "n_pairs": result.summary.n_pairs,
                "fraction": {str(k): v for k, v in result.summary.fraction.items()},
                "command": command,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    try:
        from collective.report.plots import plot_reach

        plot_reach([result.summary], out / "reach.png", title=f"{loaded.name}: reachability")
    except Exception as exc:  # a plot must never cost the measurement
        console.print(f"[yellow]no plot: {exc}[/]")
    console.print(table, highlight=False)
    console.print(f"wrote {out}/reach.csv, summary.md, summary.json")
    return 0


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
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
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
