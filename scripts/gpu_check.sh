#!/usr/bin/env bash
# The GPU checks of issue 23 in one call, for a machine with one NVIDIA GPU, its own torch and triton, and no network
# (README.md, "GPU"): scripts/gpu_check.sh OUT_DIR. Writes OUT_DIR/{env,kernels,ops,parity}.json and the logs beside
# them, within 8 minutes (each step has its own timeout). Exits non-zero if a step failed.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
# The C++ CPU kernels are neither built (minutes, against a torch they were not written for) nor loaded: the Triton
# kernels are what this checks. It runs from the checkout whether or not the editable install took.
export PYTHONUNBUFFERED=1 LLMC_SKIP_CPU_KERNELS=1 LLMC_DISABLE_KERNELS=cpu PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

# Python packages the machine lacks (llmc.engine's pydantic), carried as wheels in .whl/ (README.md, "GPU").
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/llmc-wheels .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/llmc-wheels || status=1
fi

timeout 60 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || echo "pip install -e . failed (see install.log); running from the checkout"

python3 - >"$OUT/env.json" 2>"$OUT/env.log" <<'PY' || status=1
import json, platform, torch, triton
gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                  "gpu": gpu.name if gpu else None, "capability": list(torch.cuda.get_device_capability()) if gpu else None}))
PY

# The Triton kernels against their references, compiled, on CUDA tensors (the tests pick CUDA when it is there).
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py --junitxml="$OUT/kernels.xml" \
    >"$OUT/kernels.log" 2>&1 || status=1
python3 scripts/junit_summary.py "$OUT/kernels.xml" >"$OUT/kernels.json" || status=1

# Each kernel's time against its reference's on the GPU (ops.json).
timeout 90 python3 scripts/gpu_op_bench.py "$OUT/ops.json" >"$OUT/ops.log" 2>&1 || status=1

# Greedy parity with transformers on CUDA, end to end through LLM(engine, device="cuda"): it may not run yet, and
# parity.json then records why.
timeout 150 python3 scripts/gpu_parity.py "$OUT/parity.json" >"$OUT/parity.log" 2>&1 || status=1

cat "$OUT/env.json" "$OUT/kernels.json" "$OUT/ops.json" "$OUT/parity.json" 2>/dev/null
exit $status
