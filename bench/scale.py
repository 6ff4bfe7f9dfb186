"""Scale benchmark: how the coordinator and the broker carry as the node count grows.

A scenario of N nodes of the test suite's tiny random model (2 layers, 32 wide: compute is
negligible) on a ring with relay messages runs distributed over a Mosquitto on 127.0.0.1
(started as the tests start it), at each node count of `--nodes`, in two configurations:

- one host: one `collective node --nodes ...` process holding all N nodes;
- per host: one host process per `--per-host` nodes (N / per-host processes).

Each (N, configuration) point runs in a fresh process of this script (`--point`), so that its
peak memory is its own. What a point measures, per round after `--warmup` rounds (medians):

- round: the coordinator's wall time of the round (`RoundEvent.wall_seconds`: requests
  built, sent, results collected and checked, pools, the reference, the book);
- compute: the slowest node's `compute_seconds` as its host reports it: reading its
  messages, the batched pass, and waiting for the host's batch, i.e. for the host's other
  requests to arrive, so it also holds part of the request fan-out (the broker and the
  host's envelope parsing); the tiny model's own pass is a few ms;
- overhead = round - compute: what the coordinator, the broker and the hosts' protocol
  work add, understated by the fan-out counted in compute; round / N bounds the cost per
  node from above (the target is at most linear growth and < 1 ms per node);
  split into bus = collect - compute (collect: the coordinator's requests out to its last
  result in, results checked on arrival: the broker, the coordinator's and the hosts'
  envelopes) and engine = round - collect (the coordinator's own round: requests built,
  the pools, the full-view reference, the book, the round record);
- coord cpu: the coordinator process's CPU time in the round (both its threads); mqtt cpu:
  its MQTT loop thread's alone (envelopes in and out, the checks of the results, the client);
- hosts cpu: the host processes' CPU time in the round, together (/proc/PID/stat: their
  batched passes, their connection and envelopes: one request and one result envelope a host
  and round since protocol 6, and the messages);
- broker cpu: the Mosquitto process's CPU time in the round (/proc/PID/stat), the broker's
  share; "broker %" is broker cpu over overhead;
- bytes in/out: bytes the broker read from and wrote to its sockets in the round
  (/proc/PID/io rchar/wchar: MQTT framing included, every publish counted once in and
  once per subscriber out);
- coord MiB: the coordinator process's peak resident memory (ru_maxrss) at the end, and
  its growth over the same process before it connected;
- host MiB: the largest host process's peak resident memory (VmHWM) at the last round.

Each point runs `--repeats` times (default 3, each a fresh process); the table gives the
median of the repeats and, for each fitted measure, the spread (min..max over the repeats).
How a measure grows, per configuration: a least-squares fit of value = a + b*N over every
repeat of every node count (a: the fixed cost per round, b: ms per node), and the slope of
log(value) on log(N) segment by segment, the top segment (the two largest node counts) the
one that says how it grows at scale (1: linear), with its range over the repeats' pairs.
A single exponent through all points mixes the fixed cost into the slope and is not given.

    python bench/scale.py --nodes 16,64 --rounds 3 --repeats 1     # a smoke run: ~2 min
    python bench/scale.py --nodes 16,64,256 --rounds 8 --out bench-out/scale
    python bench/scale.py --nodes 1024 --allow-1024 --rounds 4     # time permitting
    python bench/scale.py --nodes 64,256 --profile bench-out/prof  # cProfile of the coordinator and a host
    python bench/scale.py --nodes 64,256 --logins                  # a login and ACL per host (collective broker --hosts)

Each repeat records the 1-minute load average before and after it (`load`): the machine may be
shared. Needs `mosquitto` on the PATH (apt-get install mosquitto). Runs everything with one
torch thread per process.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scale_fit import growth  # noqa: E402
from bench.scale_print import CONFIGS, FITTED, plot, print_growth, print_spread, print_table, spread  # noqa: E402

COLUMNS = (
    "round_ms", "compute_ms", "overhead_ms", "bus_ms", "engine_ms", "coord_cpu_ms", "mqtt_cpu_ms", "broker_cpu_ms", "bytes_in", "bytes_out",
)
SAMPLED = (*COLUMNS, "hosts_cpu_ms")  # the hosts' CPU time moves in clock ticks too: a mean
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- pure pieces


def host_groups(node_ids: list[str], per_host: int | None) -> list[list[str]]:
    """The nodes of each host process: all in one (per_host None), else `per_host` at a time."""
    size = len(node_ids) if per_host is None else max(1, per_host)
    return [node_ids[i : i + size] for i in range(0, len(node_ids), size)]


def hosts_of(n_nodes: int, per_host: int, max_hosts: int) -> int:
    """Nodes per host in the per-host configuration: `per_host`, or more when that would start
    more than `max_hosts` processes (each loads torch and the model: memory)."""
    return max(per_host, -(-n_nodes // max(1, max_hosts)))


def scenario_spec(n_nodes: int, model_dir: Path, rounds: int, warmup: int, round_tokens: int, top_k: int) -> dict[str, Any]:
    """N tiny nodes on a ring (relay messages: each node's message is a slice of what it read)."""
    lagged = {"kind": "lagged", "tokens": 16, "lag": round_tokens}
    return {
        "name": f"bench-scale-{n_nodes}",
        "seed": 0,
        "corpus": {"source": "builtin:pydoc", "train_tokens": 128, "eval_tokens": rounds * round_tokens},
        "models": {"tiny": {"ref": str(model_dir), "dtype": "float32", "device": "cpu"}},
        "node_defaults": {"model": "tiny", "message": {"policy": "relay"}},
        "nodes": [
            {"id": f"n{i:04d}", "view": {"kind": "window", "tokens": 16} if i % 2 == 0 else lagged} for i in range(n_nodes)
        ],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": round_tokens, "max_message_tokens": 8, "max_message_bytes": 64},
        "evaluation": {"context_tokens": 32, "warmup_rounds": warmup, "top_k": top_k},
    }


# ---------------------------------------------------------------------------- one point (its own process)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _proc_io(pid: int) -> tuple[int, int]:
    values = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(values["rchar"]), int(values["wchar"])


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def _sample(broker_pid: int, loop_thread: int, hosts: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    rchar, wchar = _proc_io(broker_pid)
    return {
        "t": time.perf_counter(), "cpu": time.process_time(), "mqtt": time.clock_gettime(loop_thread),
        "broker": _proc_cpu_s(broker_pid), "in": rchar, "out": wchar,
        "hosts": sum(_proc_cpu_s(p.pid) for p in hosts if p.poll() is None),
    }


def _start_hosts(folder: Path, urls: list[str], run_id: str, groups: list[list[str]], profile: Path | None) -> list[subprocess.Popen[bytes]]:
    processes = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for index, (url, group) in enumerate(zip(urls, groups)):
        prefix = [sys.executable]
        if profile is not None and index == 0:
            prefix += ["-m", "cProfile", "-o", str(profile / f"host-{len(group)}.prof")]
        command = prefix + ["-m", "collective.cli", "node", "--broker", url, "--run", run_id, "--nodes", ",".join(group),
                            "--threads", "1", "--scenario-timeout", "900"]
        log = (folder / f"host-{index}.log").open("wb")
        processes.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env))
    return processes


class RoundProfiler:
    """cProfile of the coordinator's measured rounds, in its main thread and in its MQTT loop
    thread, summed into one file (`start` after the warm-up, `stop` after the last round)."""

    def __init__(self, executor: Any, out: Path | None) -> None:
        self.executor, self.out = executor, out
        self.main, self.loop = cProfile.Profile(), cProfile.Profile()
        self.running = False

    def start(self) -> None:
        if self.out is not None and not self.running:
            self.running = True
            self.executor._thread.call_soon(self.loop.enable)
            self.main.enable()

    def stop(self) -> None:
        if not self.running or self.out is None:
            return
        self.running = False
        self.main.disable()
        self.executor._thread.call(_disable(self.loop), timeout=10)
        import pstats

        stats = pstats.Stats(self.main)
        stats.add(self.loop)
        stats.dump_stats(str(self.out))


async def _disable(profile: cProfile.Profile) -> None:
    profile.disable()


def per_round_measures(samples: list[dict[str, float]], walls: list[float], compute: list[float], collect: list[float],
                       warmup: int) -> list[dict[str, float]]:
    """Each measured round's columns (ms, bytes) from the samples taken before and after it
    (`samples[i]` before round i: one more sample than rounds), its wall time, the slowest
    node's compute and the coordinator's collect time; the first `warmup` rounds left out."""
    per_round = []
    for index in range(warmup, len(walls)):
        before, after = samples[index], samples[index + 1]
        per_round.append({
            "round_ms": 1000 * walls[index],
            "compute_ms": 1000 * compute[index],
            "overhead_ms": 1000 * (walls[index] - compute[index]),
            "bus_ms": 1000 * (collect[index] - compute[index]),
            "engine_ms": 1000 * (walls[index] - collect[index]),
            "coord_cpu_ms": 1000 * (after["cpu"] - before["cpu"]),
            "mqtt_cpu_ms": 1000 * (after["mqtt"] - before["mqtt"]),
            "broker_cpu_ms": 1000 * (after["broker"] - before["broker"]),
            "hosts_cpu_ms": 1000 * (after["hosts"] - before["hosts"]),
            "bytes_in": after["in"] - before["in"],
            "bytes_out": after["out"] - before["out"],
        })
    return per_round


def _prepare_point(args: argparse.Namespace) -> tuple[Path, Any]:
    """A fresh folder with the tiny model and the point's scenario, prepared (models loaded)."""
    from collective.lm.models import ModelPool
    from collective.run.runner import prepare
    from collective.scenario import load_scenario
    from tests.tiny import tiny_llama, tiny_tokenizer

    folder = Path(tempfile.mkdtemp(prefix=f"bench-scale-{args.point}-"))
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    spec = scenario_spec(args.point, folder / "tiny", args.rounds, args.warmup, args.round_tokens, args.top_k)
    (folder / "scenario.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    scenario = load_scenario(folder / "scenario.yaml")
    return folder, prepare(scenario, ModelPool(cache_dir=folder / "cache"), base_dir=folder)


@dataclass(frozen=True)
class MeasuredRun:
    """A point's distributed run as sampled: `samples` once before the first round and after
    each round, each round's wall time, the hosts' peak memory at the last round, the time
    every node took to join, and the executor's round collector (its collect and compute times)."""

    samples: list[dict[str, float]]
    walls: list[float]
    host_peaks: list[float]
    joined_s: float
    rounds: Any


def _run_measured(args: argparse.Namespace, folder: Path, prepared: Any, groups: list[list[str]]) -> MeasuredRun:
    """The distributed run of the point: broker, hosts, the coordinator here (see `MeasuredRun`)."""
    from bench.bus import reaped
    from collective.distributed.broker import max_packet_size_for, users_for
    from collective.distributed.coordinator import connect_executor
    from collective.run.runner import run_prepared
    from tests.mosquitto import running_broker

    scenario = prepared.scenario
    profile = Path(args.profile) if args.profile else None
    label = f"{args.point}-{'one' if len(groups) == 1 else f'per{args.per_host}'}"
    samples: list[dict[str, float]] = []
    walls: list[float] = []
    host_peaks: list[float] = []
    logins = {f"host{k}": group for k, group in enumerate(groups)} if args.logins else {}
    users = {**users_for(scenario), **{login: f"{login}-pass" for login in logins}} if args.logins else {}
    # the packet size `collective broker --scenario` writes: a host envelope is packed up to it
    packet = max_packet_size_for(scenario)
    with running_broker(folder / "broker", users=users, hosts=logins, max_packet_size=packet) as broker:
        broker_pid = broker.process.pid
        urls = [broker.url(login) for login in logins] if args.logins else [broker.url()] * len(groups)
        hosts = _start_hosts(folder, urls, "scale", groups, profile)

        def on_event(event: Any) -> None:
            samples.append(_sample(broker_pid, loop_clock, hosts))
            walls.append(event.wall_seconds)
            if len(walls) == args.warmup:
                profiler.start()
            if len(walls) == args.rounds + args.warmup:  # the last round: the hosts are still up
                profiler.stop()
                host_peaks.extend(_peak_rss_mib(p.pid) for p in hosts if p.poll() is None)

        began = time.perf_counter()
        coordinator = broker.url("coordinator") if args.logins else broker.url()
        with reaped(hosts, 120), connect_executor(
            prepared, coordinator, run_id="scale", on_status=lambda line: None, join_timeout=900
        ) as executor:
            joined_s = time.perf_counter() - began
            loop_ident = executor._thread._thread.ident  # its MQTT loop thread
            if loop_ident is None:
                raise RuntimeError("the coordinator's MQTT loop thread has not started: no CPU clock to read")
            loop_clock = time.pthread_getcpuclockid(loop_ident)
            samples.append(_sample(broker_pid, loop_clock, hosts))
            profiler = RoundProfiler(executor, None if profile is None else profile / f"coordinator-{label}.prof")
            run_prepared(prepared, folder / "run", executor=executor, runtime="mqtt", on_event=on_event)
    return MeasuredRun(samples, walls, host_peaks, joined_s, executor.rounds)


def run_point(args: argparse.Namespace) -> dict[str, Any]:
    """One (N, configuration) point: broker, hosts, the coordinator here; returns its measures."""
    import torch

    torch.set_num_threads(1)
    folder, prepared = _prepare_point(args)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    groups = host_groups(prepared.scenario.node_ids, None if args.one_host else args.per_host)
    run = _run_measured(args, folder, prepared, groups)
    per_round = per_round_measures(run.samples, run.walls, run.rounds.round_compute_s, run.rounds.round_wall_s, args.warmup)
    medians = {name: statistics.median(r[name] for r in per_round) for name in COLUMNS}
    # the broker's CPU time moves in clock ticks (10 ms): its mean over the measured rounds
    medians["broker_cpu_ms"] = statistics.fmean(r["broker_cpu_ms"] for r in per_round)
    medians["hosts_cpu_ms"] = statistics.fmean(r["hosts_cpu_ms"] for r in per_round)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "nodes": args.point, "config": CONFIGS[0] if len(groups) == 1 else CONFIGS[1], "hosts": len(groups),
        "rounds": len(per_round), "join_s": run.joined_s, **medians,
        "ms_per_node": medians["overhead_ms"] / args.point, "coord_mib": rss, "coord_growth_mib": rss - rss_before,
        "host_mib": max(run.host_peaks, default=math.nan), "per_round": per_round,
    }


# ---------------------------------------------------------------------------- the sweep (this process)


def _point(args: argparse.Namespace, n_nodes: int, per_host: int | None, folder: Path) -> dict[str, Any]:
    """The point measured `--repeats` times: each column the median of the repeats, and
    `repeats` (each repeat's numbers) for the spread and the fits."""
    runs = [_one_run(args, n_nodes, per_host, folder, repeat) for repeat in range(args.repeats)]
    point = {key: value for key, value in runs[0].items() if key != "per_round"}
    point["load"] = [load for run in runs for load in run["load"]]  # 1-minute load averages, before and after each repeat
    for key in (*SAMPLED, "ms_per_node", "coord_mib", "coord_growth_mib", "host_mib", "join_s"):
        point[key] = statistics.median(run[key] for run in runs)
    point["repeats"] = [{key: run[key] for key in (*SAMPLED, "ms_per_node")} for run in runs]
    return point


def _one_run(args: argparse.Namespace, n_nodes: int, per_host: int | None, folder: Path, repeat: int) -> dict[str, Any]:
    out = folder / f"point-{n_nodes}-{per_host or 'all'}-r{repeat}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--point", str(n_nodes), "--json", str(out),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--round-tokens", str(args.round_tokens),
               "--top-k", str(args.top_k)]
    command += ["--one-host"] if per_host is None else ["--per-host", str(per_host)]
    if args.profile:
        command += ["--profile", args.profile]
    if args.logins:
        command += ["--logins"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = os.getloadavg()[0]
    subprocess.run(command, check=True, env=env, cwd=REPO)
    return {**json.loads(out.read_text()), "load": [before, os.getloadavg()[0]]}


def run_sweep(args: argparse.Namespace) -> int:
    counts = [int(n) for n in args.nodes.split(",")]
    if args.repeats < 1:
        sys.stderr.write("--repeats must be at least 1\n")
        return 2
    if any(n > 512 for n in counts) and not args.allow_1024:
        sys.stderr.write("more than 512 nodes needs --allow-1024 (time: a point of 1024 nodes takes minutes)\n")
        return 2
    from collective.distributed.broker import mosquitto_binary

    if mosquitto_binary() is None:
        sys.stderr.write("mosquitto is not installed (apt-get install mosquitto)\n")
        return 2
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    print(f"conditions: tiny Llama (2 layers, 32 wide), float32, 1 torch thread per process, ring, relay messages, "
          f"{args.round_tokens} tokens/round, top-k {args.top_k}; {args.warmup} warm-up + {args.rounds} measured rounds "
          f"(medians); Mosquitto on 127.0.0.1 {'with a login and ACL per host' if args.logins else 'anonymous, no ACL'}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    points = []
    for n_nodes in counts:
        for per_host in (None, hosts_of(n_nodes, args.per_host, args.max_hosts)):
            if per_host is not None and per_host >= n_nodes:
                continue  # one host per 16 of 16 nodes is the one-host configuration
            if per_host is not None and per_host != args.per_host:
                print(f"  {n_nodes} nodes: hosts of {per_host} (--max-hosts {args.max_hosts}: a host process holds "
                      f"~300 MiB of its own)", flush=True)
            points.append(_point(args, n_nodes, per_host, folder))
            low, high = spread(points[-1], "overhead_ms")
            print(f"  {n_nodes} nodes, {points[-1]['config']}: overhead {points[-1]['overhead_ms']:.1f} ms/round "
                  f"(median of {args.repeats}; {low:.1f}..{high:.1f}); load {min(points[-1]['load']):.1f}..{max(points[-1]['load']):.1f}", flush=True)
    print_table(points)
    print_spread(points)
    fits = growth(points, CONFIGS, FITTED)
    print_growth(fits)
    print("definitions: overhead = the coordinator's round wall time - the slowest node's compute = bus + engine; "
          "bus = requests out to the last result in, less that compute (broker, envelopes, checks); engine = the "
          "coordinator's own round (requests, pools, reference, book); broker % = broker cpu / overhead; bytes = "
          "the broker's socket reads (in) and writes (out) in the round")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    (folder / "scale.json").write_text(json.dumps({"points": points, "growth": fits}, indent=1))
    with (folder / "scale.csv").open("w") as csv:
        csv.write("nodes,config,hosts," + ",".join(SAMPLED) + ",ms_per_node,coord_mib,host_mib\n")
        for p in points:
            values = [p["nodes"], p["config"], p["hosts"], *(round(p[c], 3) for c in SAMPLED), round(p["ms_per_node"], 4),
                      round(p["coord_mib"], 1), round(p["host_mib"], 1)]
            csv.write(",".join(str(v) for v in values) + "\n")
    plot(points, folder / "scale.png")
    print(f"wrote {folder / 'scale.csv'}, {folder / 'scale.json'}, {folder / 'scale.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="16,64,256", help="node counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds per point (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not measured (joins, first passes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each point (each a fresh process); the median and the spread are shown")
    parser.add_argument("--per-host", type=int, default=16, help="nodes per host process in the second configuration")
    parser.add_argument("--max-hosts", type=int, default=16,
                        help="at most this many host processes (about 300 MiB each): more nodes go into larger hosts")
    parser.add_argument("--round-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64, help="candidates kept per position (the scenario default: 64)")
    parser.add_argument("--out", help="folder for scale.csv, scale.json and scale.png (default: a temp folder)")
    parser.add_argument("--profile", help="folder for cProfile files of the coordinator and of the first host")
    parser.add_argument("--logins", action="store_true", help="logins and ACLs as `collective broker --hosts` writes them (a login per host)")
    parser.add_argument("--allow-1024", action="store_true", help="allow node counts over 512")
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: one point in this process
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--one-host", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point is None:
        return run_sweep(args)
    Path(args.json).write_text(json.dumps(run_point(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
