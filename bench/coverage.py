"""Coverage of the report's 95% intervals at the run lengths the project ships.

For each interval method, number of eval rounds R and kind of data, the share of
replications whose interval covers the truth, its Monte Carlo standard error and the mean
width (nats/token). Data kinds (each round: a per-token NLL times 16-48 scored tokens, a
ratio estimator, as in a report row):
  independent   per-token NLL 2.0 + 0.3 N(0, 1), rounds independent; truth 2.0
  AR(1) 0.5     the same with a stationary AR(1) series, phi 0.5 (the calibration point)
  AR(1) 0.3     phi 0.3 (between the two)
  skewed        independent, 0.3 x a centred, scaled log-normal (sigma 1): skewed, heavy right tail
  heavy         independent, 0.3 x Student t with 3 degrees of freedom (scaled to unit variance)
  real          differences of two rows (best isolated member - collective, silent ensemble -
                collective) recorded from long runs of shipped scenarios (tests/data/round_series.json):
                every R-round stretch, truth = the difference over the whole recording.
Real stretches overlap, so their Monte Carlo error is larger than binomial; the table's
standard error for them is binomial on the number of non-overlapping stretches.

Methods: `calibrated NW1` (the evaluator's, collective/evaluate/intervals.py), `t` (plain
t on the linearised residuals, R - 1 df), `batch means t` (ceil(R^(1/3))-round batches,
t with batches - 1 df), `calibrated t` (the plain t pivot with the critical value
calibrated like the evaluator's) and `block bootstrap` (the percentile circular block
bootstrap the evaluator used before, block ceil(R^(1/3)), capped at R - 1).

    .venv/bin/python bench/coverage.py            # the full table (about 10 minutes on 2 cores)
    .venv/bin/python bench/coverage.py --quick    # the evaluator's method only, one line per case
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collective.evaluate.intervals import (  # noqa: E402
    CALIBRATION_PHI,
    ar1_series,
    critical_value,
    lag1_variance,
)

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "round_series.json"
ROUNDS = (8, 10, 16, 32)
SMALL_ROUNDS = (3, 4, 5, 6)  # where an interval starts to hold its level (the evaluator's MIN_ROUNDS)
SYNTHETIC = ("independent", "AR(1) 0.5", "AR(1) 0.3", "skewed", "heavy")
NLL_MEAN, NLL_SCALE = 2.0, 0.3

Rows = list[tuple[torch.Tensor, torch.Tensor]]  # per row: nll_sum (M, R), n_tokens (M, R)


# ---------------------------------------------------------------------------- data


def synthetic(kind: str, n_series: int, n_rounds: int, generator: torch.Generator) -> tuple[Rows, torch.Tensor]:
    """One row per replication: nll_sum and n_tokens (M, R), and the truth (M,)."""
    if kind.startswith("AR(1)"):
        noise = ar1_series(n_series, n_rounds, float(kind.split()[1]), generator)
        noise = noise * math.sqrt(1.0 - float(kind.split()[1]) ** 2)  # unit marginal variance
    elif kind == "skewed":
        lognormal = torch.randn(n_series, n_rounds, generator=generator, dtype=torch.float64).exp()
        noise = (lognormal - math.exp(0.5)) / math.sqrt((math.e - 1.0) * math.e)
    elif kind == "heavy":
        normal = torch.randn(n_series, n_rounds, generator=generator, dtype=torch.float64)
        chi2 = torch.randn(n_series, n_rounds, 3, generator=generator, dtype=torch.float64).pow(2).sum(-1)
        noise = normal / (chi2 / 3.0).sqrt() / math.sqrt(3.0)  # t(3) has variance 3
    else:
        noise = torch.randn(n_series, n_rounds, generator=generator, dtype=torch.float64)
    tokens = torch.randint(16, 49, (n_series, n_rounds), generator=generator).double()
    return [((NLL_MEAN + NLL_SCALE * noise) * tokens, tokens)], torch.full((n_series,), NLL_MEAN, dtype=torch.float64)


def load_real(path: Path = FIXTURE) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per 'scenario: gain', the two rows' nll_sum and n_tokens (L,) of the whole recording."""
    data = json.loads(path.read_text())
    series: dict[str, tuple[torch.Tensor, ...]] = {}
    for scenario, record in data["scenarios"].items():
        rows = {name: (torch.tensor(row["nll_sum"], dtype=torch.float64), torch.tensor(row["n_tokens"], dtype=torch.float64))
                for name, row in record["rows"].items()}
        if not torch.equal(rows["best_member"][0], rows["ensemble_silent"][0]):  # a readout of the best member: one series
            series[f"{scenario}: collective gain"] = (*rows["best_member"], *rows["collective"])
        series[f"{scenario}: communication gain"] = (*rows["ensemble_silent"], *rows["collective"])
    return series


def real(n_rounds: int, series: dict[str, tuple[torch.Tensor, ...]]) -> tuple[Rows, torch.Tensor, int]:
    """Every n_rounds-long stretch of every recorded difference, the truth (the difference
    over the whole recording) and the number of non-overlapping stretches."""
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    truths, independent = [], 0
    for nll_a, tok_a, nll_b, tok_b in series.values():
        length = int(nll_a.shape[0])
        truth = float(nll_a.sum() / tok_a.sum() - nll_b.sum() / tok_b.sum())
        for part, values in zip(parts, (nll_a, tok_a, nll_b, tok_b)):
            part.append(values.unfold(0, n_rounds, 1))  # (L - R + 1, R)
        truths.append(torch.full((length - n_rounds + 1,), truth, dtype=torch.float64))
        independent += length // n_rounds
    a_nll, a_tok, b_nll, b_tok = (torch.cat(part) for part in parts)
    return [(a_nll, a_tok), (b_nll, b_tok)], torch.cat(truths), independent


# ---------------------------------------------------------------------------- methods


def estimate(rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio estimator (a row, or the difference of two) and its linearised residuals:
    value (M,), residuals (M, R)."""
    values, residuals = [], []
    for nll, tokens in rows:
        theta = nll.sum(-1) / tokens.sum(-1)  # (M,)
        values.append(theta)
        residuals.append((nll - theta[:, None] * tokens) / tokens.mean(-1, keepdim=True))
    if len(rows) == 1:
        return values[0], residuals[0]
    return values[0] - values[1], residuals[0] - residuals[1]


def half_nw1(residuals: torch.Tensor, confidence: float) -> torch.Tensor:
    n_rounds = residuals.shape[-1]
    return critical_value(n_rounds, confidence) * (lag1_variance(residuals) / n_rounds).sqrt()


def _plain_se(residuals: torch.Tensor) -> torch.Tensor:
    n_rounds = residuals.shape[-1]
    return (residuals.pow(2).sum(-1) / (n_rounds - 1) / n_rounds).sqrt()


def half_t(residuals: torch.Tensor, confidence: float) -> torch.Tensor:
    n_rounds = residuals.shape[-1]
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, n_rounds - 1)) * _plain_se(residuals)


def _nw1_se(residuals: torch.Tensor) -> torch.Tensor:
    return (lag1_variance(residuals) / residuals.shape[-1]).sqrt()


def _ar1_plugin_se(residuals: torch.Tensor) -> torch.Tensor:
    """The AR(1) plug-in long-run variance gamma_0 (1 + rho) / (1 - rho), rho = gamma_1 /
    gamma_0 clamped to [-0.9, 0.9]."""
    n_rounds = residuals.shape[-1]
    gamma0 = residuals.pow(2).sum(-1) / n_rounds
    gamma1 = (residuals[..., 1:] * residuals[..., :-1]).sum(-1) / n_rounds
    rho = (gamma1 / gamma0).clamp(-0.9, 0.9)
    return (gamma0 * (1 + rho) / (1 - rho) / n_rounds).sqrt()


_CALIBRATED: dict[tuple[str, int, float], float] = {}


def calibrated(se: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """A half-width c(R) se(residuals), c(R) the 95% quantile of |mean| / se under Gaussian
    AR(1) rounds with phi CALIBRATION_PHI (as the evaluator's; its own seed here)."""

    def half(residuals: torch.Tensor, confidence: float) -> torch.Tensor:
        n_rounds = residuals.shape[-1]
        key = (se.__name__, n_rounds, confidence)
        if key not in _CALIBRATED:
            series = ar1_series(200_000, n_rounds, CALIBRATION_PHI, torch.Generator().manual_seed(7 + n_rounds))
            pivot = series.mean(-1).abs() / se(series - series.mean(-1, keepdim=True))
            _CALIBRATED[key] = float(torch.quantile(pivot.nan_to_num(nan=math.inf), confidence))
        return _CALIBRATED[key] * se(residuals)

    return half


half_calibrated_t = calibrated(_plain_se)


def half_batch_means(residuals: torch.Tensor, confidence: float) -> torch.Tensor:
    n_rounds = residuals.shape[-1]
    batch = math.ceil(round(n_rounds ** (1 / 3), 9))
    n_batches = n_rounds // batch
    means = residuals[..., : n_batches * batch].reshape(*residuals.shape[:-1], n_batches, batch).mean(-1)
    se = (means.var(-1) / n_batches).sqrt()
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, n_batches - 1)) * se


def percentile_bootstrap(rows: Rows, confidence: float, generator: torch.Generator, n_boot: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The old evaluator's interval: circular blocks of ceil(R^(1/3)) rounds (capped at
    R - 1), percentile ends. Returns low, high (M,)."""
    n_rounds = rows[0][0].shape[-1]
    block = min(math.ceil(round(n_rounds ** (1 / 3), 9)), max(1, n_rounds - 1))
    n_blocks = math.ceil(n_rounds / block)
    starts = torch.randint(0, n_rounds, (n_boot, n_blocks, 1), generator=generator)
    index = ((starts + torch.arange(block)) % n_rounds).reshape(n_boot, -1)[:, :n_rounds]
    counts = torch.zeros(n_boot, n_rounds, dtype=torch.float64).scatter_add_(1, index, torch.ones(index.shape, dtype=torch.float64))
    samples = None
    for sign, (nll, tokens) in zip((1.0, -1.0), rows):
        ratio = (nll @ counts.T) / (tokens @ counts.T)  # (M, B)
        samples = sign * ratio if samples is None else samples + sign * ratio
    assert samples is not None
    alpha = (1.0 - confidence) / 2
    ends = torch.quantile(samples, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=-1)
    return ends[0], ends[1]


HalfWidth = Callable[[torch.Tensor, float], torch.Tensor]
STUDENTIZED: dict[str, HalfWidth] = {
    "calibrated NW1": half_nw1,
    "t": half_t,
    "batch means t": half_batch_means,
    "calibrated t": half_calibrated_t,
    "calibrated AR(1) plug-in": calibrated(_ar1_plugin_se),
}
CHOSEN = "calibrated NW1"


def interval(method: str, rows: Rows, confidence: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """low, high (M,) of `method` on the replications in `rows`."""
    if method == "block bootstrap":
        chunks = [percentile_bootstrap([(n[i : i + 200], t[i : i + 200]) for n, t in rows], confidence, generator)
                  for i in range(0, rows[0][0].shape[0], 200)]
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    value, residuals = estimate(rows)
    half = STUDENTIZED[method](residuals, confidence)
    return value - half, value + half


# ---------------------------------------------------------------------------- the table


def measure(method: str, kind: str, n_rounds: int, replications: int, real_series: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed + 1000 * n_rounds + SYNTHETIC.index(kind) if kind in SYNTHETIC else seed)
    if kind == "real":
        rows, truth, independent = real(n_rounds, real_series)
    else:
        rows, truth = synthetic(kind, replications, n_rounds, generator)
        independent = replications
    low, high = interval(method, rows, 0.95, generator)
    covered = ((low <= truth) & (truth <= high)).double()
    share = float(covered.mean())
    return {
        "method": method, "R": n_rounds, "kind": kind, "coverage": share,
        "mc_se": math.sqrt(max(share * (1 - share), 1e-12) / independent), "width": float((high - low).mean()),
        "n": int(covered.shape[0]),
    }


def record(sources: list[str], path: Path = FIXTURE) -> None:
    """Write the fixture from run folders given as NAME=RUN_DIR: per eval round, the number of
    scored tokens and the summed NLL of the best isolated member (lowest NLL over the whole
    run), the silent ensemble and the collective, from each run's events.jsonl (numbers only:
    no text). A round's NLL in the events is a mean over its tokens: nll_sum = mean x tokens."""
    scenarios = {}
    for source in sources:
        name, run_dir = source.split("=", 1)
        events = [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]
        rounds = [e for e in events if e.get("kind") == "round" and e.get("phase") == "eval"]
        tokens = [int(e["n_tokens"]) for e in rounds]
        members = {node["node_id"]: [float(n["nll_isolated"]) for e in rounds for n in e["nodes"] if n["node_id"] == node["node_id"]]
                   for node in rounds[0]["nodes"]}
        best = min(members, key=lambda node_id: sum(v * t for v, t in zip(members[node_id], tokens)))
        means = {"best_member": members[best], "ensemble_silent": [float(e["nll_silent"]) for e in rounds],
                 "collective": [float(e["nll_collective"]) for e in rounds]}
        scenarios[name] = {
            "source": f"scenarios/{name}.yaml (seed 0) with corpus.eval_tokens raised: its first {len(rounds)} eval rounds "
                      f"({sum(tokens)} tokens), collective run --threads 1",
            "n_rounds": len(rounds), "best_member": best,
            "rows": {row: {"nll_sum": [round(v * t, 5) for v, t in zip(values, tokens)], "n_tokens": tokens}
                     for row, values in means.items()},
        }
    note = ("Per eval round of long runs of shipped scenarios: summed NLL (nats) and scored tokens of the best isolated "
            "member, the silent ensemble and the collective. Written by `bench/coverage.py --record NAME=RUN_DIR ...` "
            "from each run's events.jsonl; read by bench/coverage.py and tests/test_intervals.py (real-series coverage).")
    path.write_text(json.dumps({"note": note, "scenarios": scenarios}, indent=None) + "\n")


METHODS = ("calibrated NW1", "calibrated t", "calibrated AR(1) plug-in", "batch means t", "t", "block bootstrap")
REQUIRED = ("independent", "AR(1) 0.5", "real")  # the cases a method must cover at >= 0.93, R in ROUNDS
PASS_COVERAGE = 0.93


def choice_table(rows: list[dict]) -> str:
    """Per method: its lowest coverage over the required cases, whether it passes, and its
    mean width over them (the choice: the narrowest that passes)."""
    lines = ["| method | lowest coverage (independent, AR(1) 0.5, real; R = 8, 10, 16, 32) | passes | mean width there |",
             "| --- | ---: | --- | ---: |"]
    for method in METHODS:
        wanted = [r for r in rows if r["method"] == method and r["kind"] in REQUIRED and r["R"] in ROUNDS]
        lowest = min(r["coverage"] for r in wanted)
        width = sum(r["width"] for r in wanted) / len(wanted)
        lines.append(f"| {method} | {lowest:.3f} | {'yes' if lowest >= PASS_COVERAGE else 'no'} | {width:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the evaluator's method only, one line per case (minutes)")
    parser.add_argument("--replications", type=int, default=None, help="synthetic replications per case")
    parser.add_argument("--record", nargs="+", metavar="NAME=RUN_DIR", help="write the real-series fixture from run folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.record:
        record(args.record)
        return
    real_series = load_real()
    started = time.perf_counter()
    if args.quick:
        replications = args.replications or 20_000
        for n_rounds in ROUNDS:
            for kind, label in (("independent", "independent"), ("AR(1) 0.5", "AR(1)"), ("real", "real")):
                row = measure(CHOSEN, kind, n_rounds, replications, real_series)
                print(f"R={n_rounds} {label} coverage={row['coverage']:.3f} width={row['width']:.2f}", flush=True)
        return
    replications = args.replications or 20_000
    print("| method | R | data | coverage | MC s.e. | mean width |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    kinds = (*SYNTHETIC, "real")
    rows = []
    for method in METHODS:
        reps = replications if method != "block bootstrap" else min(replications, 2000)
        rounds = (*SMALL_ROUNDS, *ROUNDS) if method in ("calibrated NW1", "calibrated t") else ROUNDS
        for n_rounds in rounds:
            for kind in kinds:
                row = measure(method, kind, n_rounds, reps, real_series)
                rows.append(row)
                print(f"| {method} | {n_rounds} | {kind} | {row['coverage']:.3f} | {row['mc_se']:.3f} | {row['width']:.3f} |", flush=True)
    print()
    print(choice_table(rows))
    print()
    print(f"| {CHOSEN}, real series one by one | R | coverage | stretches | mean width |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, series in real_series.items():
        for n_rounds in ROUNDS:
            row = measure(CHOSEN, "real", n_rounds, 0, {name: series})
            print(f"| {name} ({int(series[0].shape[0])} rounds) | {n_rounds} | {row['coverage']:.3f} | {row['n']} | {row['width']:.3f} |")
    print(f"({time.perf_counter() - started:.0f} s; synthetic: {replications} replications per case, "
          f"block bootstrap {min(replications, 2000)} with 1000 resamples; real: every stretch of {FIXTURE.name})")


if __name__ == "__main__":
    main()
