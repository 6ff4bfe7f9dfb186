"""The receivers' objective against GCG steps (issue 23): how many steps a searched message needs.

Runs a scenario whose sending nodes search their messages (`message.policy: search`) for a
few rounds at `--steps` steps, and records each search's best objective after every step
(the sender's estimate of its readers' NLL of the span, nats/token: `objective: receiver`
scores each out-neighbour's context). It prints, per step, the mean over the searches of the
objective's drop from the message the search started at (the relay), and the seconds a step
took; and writes them to --out/curve.json.

    PYTHONPATH=. python bench/search_steps.py scenarios/language-game/lagged-reader.yaml \\
        --steps 20 --eval-rounds 4 --threads 1 --out sweeps/steps \\
        --set corpus.source=wikitext2 --set corpus.path=../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

import collective.run.messages as run_messages  # noqa: E402
from collective.cli import main as cli_main  # noqa: E402


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts and lists (a number indexes a list)."""
    parts = dotted.split(".")
    here: Any = data
    for part in parts[:-1]:
        here = here[int(part)] if isinstance(here, list) else here.setdefault(part, {})
    last = parts[-1]
    if isinstance(here, list):
        here[int(last)] = value
    else:
        here[last] = value


def drop_curve(searches: list[dict[str, Any]], steps: int) -> list[float]:
    """Mean over searches of (objective after step k) - (objective of the start), k = 0..steps
    (k = 0 is 0 by definition). Each search's `losses` is its best objective after each step
    (non-increasing); a search that stopped early keeps its last value."""
    curve = []
    for k in range(steps + 1):
        drops = []
        for search in searches:
            losses = search["losses"]
            best = search["initial"] if k == 0 or not losses else losses[min(k, len(losses)) - 1]
            drops.append(best - search["initial"])
        curve.append(sum(drops) / len(drops))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--search-width", type=int, default=64)
    parser.add_argument("--eval-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path(args.scenario).read_text(encoding="utf-8"))
    for item in args.sets:
        path, value = item.split("=", 1)
        set_dotted(data, path, yaml.safe_load(value))
    data["corpus"]["eval_tokens"] = args.eval_rounds * int(data["bus"]["round_tokens"])
    for holder in [data.get("node_defaults", {}), *data["nodes"]]:
        if holder.get("message", {}).get("policy") == "search":
            holder["message"].update(steps=args.steps, search_width=args.search_width)
    scenario = out / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    searches: list[dict[str, Any]] = []
    original = run_messages.search_messages

    def recording(*a: Any, **k: Any) -> Any:
        began = time.perf_counter()
        results = original(*a, **k)
        seconds = time.perf_counter() - began
        for result in results:
            searches.append({"initial": result.initial_loss, "losses": result.losses, "seconds": seconds / len(results)})
        return results

    run_messages.search_messages = recording  # type: ignore[assignment]
    code = cli_main(["run", str(scenario), "--out", str(out / "run"), "--threads", str(args.threads), "--quiet", "--no-live"])
    if code:
        sys.exit(code)
    curve = drop_curve(searches, args.steps)
    seconds_per_step = sum(s["seconds"] for s in searches) / len(searches) / args.steps
    (out / "curve.json").write_text(
        json.dumps({"searches": searches, "drop": curve, "seconds_per_step": seconds_per_step}, indent=1), encoding="utf-8"
    )
    print(f"{len(searches)} searches, {seconds_per_step:.2f} s per step; mean objective (start {sum(s['initial'] for s in searches) / len(searches):.3f} nats/token)")
    for k, drop in enumerate(curve):
        print(f"step {k:3d}: {drop:+.4f}")


if __name__ == "__main__":
    main()
