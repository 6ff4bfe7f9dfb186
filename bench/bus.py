"""Bus benchmark: the distributed runtime (MQTT) against the embedded one, in two configurations.

The same scenario runs three times through the same `RoundEngine`: embedded (one process,
all nodes in one batched pass per round, the in-memory bus) and distributed (a Mosquitto on
127.0.0.1, the coordinator in this process), once with one `collective node` process per
node and once with one host process holding all the nodes (`collective node --nodes
n0,n1,...`: one model copy, one batched pass per round, as embedded). The script checks
that both distributed runs give the embedded evaluation and messages, then prints rounds
per second and each distributed configuration's ratio against embedded (the target for the
one host: at least 0.9x), the wall time per round, and for each distributed run how much of
a round is the slowest node's own compute and how much is the bus (serialize, broker, validate).

Threads, the rule: both runtimes may use the same cores. The N node processes run
`--node-threads` torch threads each; the embedded run (and the coordinator, which scores
the full-view reference after the nodes answer) gets `--threads`, by default as many as
the node processes together, N x node-threads, capped at the machine's core count (more
threads than cores make torch spin: 10x slower rounds were seen on 2 cores). The node
processes are not capped: four one-thread processes share two cores through the OS. The one
host gets `--host-threads`, by default as many as the embedded run: it does the same
batched work.

"Same evaluation": every report row and every per-node, per-round NLL of the round events
must agree within 1e-4 nats/token in float32 (the embedded run pads the nodes into one
batch, a volunteer scores its node alone; in float32 that moves NLLs by about 1e-6; the one
host batches them as embedded does, so its numbers are the embedded ones), and
within 0.05 in bfloat16/float16, where padding moves the rounding itself; messages must be
identical.

    python bench/bus.py                          # 4 SmolLM2-135M nodes, float32, relay messages: ~2.5 min
    python bench/bus.py --model tiny             # a tiny random model: the bus overhead alone
    python bench/bus.py --eval-rounds 16 --threads 2 --node-threads 1

Needs `mosquitto` on the PATH (apt-get install mosquitto).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from collective.distributed.coordinator import connect_executor  # noqa: E402
from collective.lm.models import ModelPool  # noqa: E402
from collective.records import RoundEvent, parse_event  # noqa: E402
from collective.run.runner import prepare, run_prepared  # noqa: E402
from collective.scenario import load_scenario  # noqa: E402
from tests.mosquitto import running_broker  # noqa: E402


def write_scenario(folder: Path, args: argparse.Namespace) -> Path:
    if args.model == "tiny":
        from tests.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        tiny_llama(len(tokenizer)).save_pretrained(folder / "tiny")
        tokenizer.save_pretrained(folder / "tiny")
        model = {"ref": str(folder / "tiny"), "dtype": "float32", "device": "cpu"}
    else:
        model = {"ref": args.model, "dtype": args.dtype, "device": "cpu"}
    lagged = {"kind": "lagged", "tokens": 48, "lag": args.round_tokens}
    spec = {
        "name": "bench-bus",
        "seed": 0,
        "corpus": {
            "source": "builtin:pydoc",
            "train_tokens": 4 * args.round_tokens + 48 + args.round_tokens,
            "eval_tokens": args.eval_rounds * args.round_tokens,
        },
        "models": {"m": model},
        "node_defaults": {"model": "m", "message": {"policy": "relay"}},
        "nodes": [
            {"id": f"n{i}", "view": {"kind": "window", "tokens": 48} if i % 2 == 0 else lagged} for i in range(args.nodes)
        ],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": args.round_tokens, "max_message_tokens": 24, "max_message_bytes": 160},
        "evaluation": {"context_tokens": 128, "warmup_rounds": 2},
    }
    path = folder / "bench-bus.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def round_walls(run_dir: Path) -> list[float]:
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e.wall_seconds for e in events if isinstance(e, RoundEvent)]


def node_nlls(run_dir: Path) -> dict[tuple[int, str, str], float | None]:
    """Every NLL a round event carries: per (round, node or pool, row)."""
    out: dict[tuple[int, str, str], float | None] = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = parse_event(line)
        if not isinstance(event, RoundEvent):
            continue
        for pool in ("collective", "silent", "reference"):
            out[(event.round_index, "pool", pool)] = getattr(event, f"nll_{pool}")
        for node in event.nodes:
            for row in ("collective", "isolated", "plain"):
                out[(event.round_index, node.node_id, row)] = getattr(node, f"nll_{row}")
    return out


def max_difference(a: dict, b: dict) -> float:
    """Max |a - b| over the keys of both (inf when the keys or a missing value differ)."""
    if a.keys() != b.keys():
        return math.inf
    diffs = [abs(a[k] - b[k]) if a[k] is not None and b[k] is not None else (0.0 if a[k] == b[k] else math.inf) for k in a]
    return max(diffs, default=0.0)


def messages(run_dir: Path) -> list[tuple[str, str, int, str]]:
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [(m.sender, m.receiver, m.round_sent, m.text) for e in events if isinstance(e, RoundEvent) for m in e.messages]


@dataclass
class Distributed:
    """One distributed run of the scenario: its folder, round walls and the executor's timings."""

    name: str
    run_dir: Path
    walls: list[float]
    compute: list[float]  # per round: the slowest node's own compute
    bus: list[float]  # per round: requests out to the last result in, less that compute
    total_s: float


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen[bytes]], timeout: float) -> Iterator[None]:
    """After the block, wait up to `timeout` s for each process to end; kill what still runs
    (also when the block fails)."""
    try:
        yield
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_distributed(prepared: Any, folder: Path, name: str, node_commands: list[list[str]]) -> Distributed:
    """A Mosquitto on 127.0.0.1, the `collective node` processes (each argument list after
    `--broker URL --run RUN`), the coordinator in this process."""
    run_id = f"bench-bus-{name}"
    with running_broker(folder / f"broker-{name}") as broker:
        logs = [(folder / f"{name}-{i}.log").open("wb") for i in range(len(node_commands))]
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "collective.cli", "node", "--broker", broker.url(), "--run", run_id, *command],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
            for command, log in zip(node_commands, logs)
        ]
        try:
            with reaped(processes, 60), connect_executor(
                prepared, broker.url(), run_id=run_id, on_status=lambda line: None, join_timeout=300
            ) as executor:
                began = time.perf_counter()
                run_prepared(prepared, folder / run_id, executor=executor, runtime="mqtt")
                total_s = time.perf_counter() - began
        finally:
            for log in logs:
                log.close()
    compute = executor.rounds.round_compute_s
    bus = [wall - c for wall, c in zip(executor.rounds.round_wall_s, compute)]
    return Distributed(name, folder / run_id, round_walls(folder / run_id), compute, bus, total_s)


def compare(embedded: Any, embedded_dir: Path, run: Distributed, dtype: str) -> bool:
    """Print and return whether `run` gives the embedded evaluation and messages."""
    report = parse_report(run.run_dir)
    rows = {(r.row, r.node_id): r.nll for r in embedded.rows}
    worst_row = max_difference(rows, {(r.row, r.node_id): r.nll for r in report.rows})
    worst_round = max_difference(node_nlls(embedded_dir), node_nlls(run.run_dir))
    same_messages = messages(embedded_dir) == messages(run.run_dir)
    tolerance = 1e-4 if dtype == "float32" else 0.05
    worst = max(worst_row, worst_round)
    ok = math.isfinite(worst) and worst <= tolerance and same_messages
    print(f"{run.name}: max |delta NLL| against embedded over report rows {worst_row:.2e}, over per-node per-round NLLs "
          f"{worst_round:.2e} nats/token; same messages: {same_messages}: {'SAME' if ok else 'DIFFERENT'} "
          f"(tolerance {tolerance:g} in {dtype}); whole run {run.total_s:.1f} s")
    return ok


def parse_report(run_dir: Path) -> Any:
    from collective.records import Report

    return Report.model_validate_json((run_dir / "report.json").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a model reference, or `tiny` (random, float32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--round-tokens", type=int, default=32)
    parser.add_argument("--eval-rounds", type=int, default=16)
    parser.add_argument("--node-threads", type=int, default=1, help="torch threads per node process")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads of this process (the embedded run, the coordinator); default: nodes x node-threads, "
        "capped at the core count (see the rule above)",
    )
    parser.add_argument("--host-threads", type=int, default=None, help="torch threads of the one host process (default: --threads)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    import os

    import torch

    cores = os.cpu_count() or 1
    together = args.nodes * args.node_threads
    threads = args.threads or min(together, cores)
    host_threads = args.host_threads or threads
    torch.set_num_threads(threads)

    from collective.distributed.broker import mosquitto_binary

    if mosquitto_binary() is None:
        sys.stderr.write("mosquitto is not installed (apt-get install mosquitto)\n")
        return 2

    folder = Path(tempfile.mkdtemp(prefix="bench-bus-"))
    scenario = load_scenario(write_scenario(folder, args))
    prepared = prepare(scenario, ModelPool(), base_dir=folder)

    embedded = run_prepared(prepared, folder / "embedded")
    emb_walls = round_walls(folder / "embedded")
    per_node = run_distributed(
        prepared, folder, "per-node", [["--node", n, "--threads", str(args.node_threads)] for n in scenario.node_ids]
    )
    one_host = run_distributed(
        prepared, folder, "one-host", [["--nodes", ",".join(scenario.node_ids), "--threads", str(host_threads)]]
    )
    assert embedded.report is not None
    dtype = "float32" if args.model == "tiny" else args.dtype
    print(f"scenario: {args.nodes} nodes of {args.model} ({dtype}), "
          f"{args.round_tokens} tokens/round, {len(emb_walls)} rounds (incl. warm-up), ring, relay messages")
    print(f"threads: embedded run and coordinator {threads} (nodes x node-threads = {together}, {cores} cores); "
          f"per node: {args.nodes} node processes x {args.node_threads}; one host: 1 process x {host_threads}")
    print(f"{'runtime':<24} {'rounds/s':>9} {'ms/round (mean)':>16} {'ms/round (median)':>18} {'vs embedded':>12}")
    emb_rate = len(emb_walls) / sum(emb_walls)
    runs = (("embedded", emb_walls), ("distributed, per node", per_node.walls), ("distributed, one host", one_host.walls))
    for name, walls in runs:
        rate = len(walls) / sum(walls)
        print(f"{name:<24} {rate:>9.2f} {1000 * statistics.mean(walls):>16.1f} {1000 * statistics.median(walls):>18.1f} "
              f"{rate / emb_rate:>11.2f}x")
    for run in (per_node, one_host):
        print(f"{run.name} round, median: slowest node's compute {1000 * statistics.median(run.compute):.1f} ms, "
              f"bus and protocol {1000 * statistics.median(run.bus):.1f} ms (requests out, results in, validation)")
    same = [compare(embedded.report, folder / "embedded", run, dtype) for run in (per_node, one_host)]
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
