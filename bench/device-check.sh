#!/usr/bin/env bash
# One prepared check for a lent GPU machine, under 8 minutes: the CUDA tests and the
# throughput table, then one summary. Run from the repository root:
#
#   bash bench/device-check.sh            # OUT=<folder> keeps the logs there
#
# Python: a .venv whose torch sees CUDA is reused as it is. Otherwise .venv-gpu is made
# with --system-site-packages over the machine's python3, so its CUDA torch and the
# torchvision built for it are used as they are (never a CPU torch beside a CUDA
# torchvision: trainer/vision.py explains that pairing); only Descent's other
# dependencies are installed: from wheels in .whl/ when that folder exists (machines
# with no network: see README "Speed"), else from the package index. Nothing slow.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
started=$(date +%s)
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 MLFLOW_ALLOW_FILE_STORE=true

cuda_python() {  # a python whose torch sees a CUDA device
    [ -x "$1" ] && "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if cuda_python .venv/bin/python; then
    PY=.venv/bin/python
elif cuda_python .venv-gpu/bin/python && .venv-gpu/bin/python -c 'import mlflow, fastapi, sqlalchemy' 2>/dev/null; then
    PY=.venv-gpu/bin/python
else
    cuda_python "$(command -v python3)" || { echo "no python3 with a CUDA torch on this machine"; exit 2; }
    python3 -m venv --system-site-packages .venv-gpu
    PY=.venv-gpu/bin/python
    if [ -d .whl ]; then  # (bench/device-wheels.sh made them, where PyPI answers)
        $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -3  # (Descent itself: PYTHONPATH)
    else
        timeout 180 $PY -m pip install -q -e ".[dev]" 2>&1 | tail -3
    fi
fi
echo "== python: $PY ($($PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'))"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

echo "== pytest -m gpu"
timeout 270 $PY -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== bench/throughput.py"
left=$((450 - ($(date +%s) - started)))
if $PY -c 'import mlflow, fastapi, sqlalchemy' 2>/dev/null; then
    timeout $((left > 60 ? left : 60)) $PY bench/throughput.py --rounds 1 2>&1 | grep -v "View run\|View experiment" \
        | tee "$OUT/throughput.txt"
    bench_rc=${PIPESTATUS[0]}
else
    echo "skipped: MLflow is not installed here (no network: bench/device-wheels.sh --bench, here)" | tee "$OUT/throughput.txt"
    bench_rc=3
fi

if [ -n "${DATASETS_DIR:-}" ] && [ -d "${DATASETS_DIR}/cifar-10-batches-py" ]; then
    left=$((470 - ($(date +%s) - started)))
    if [ $left -gt 60 ]; then
        echo "== bench/real_data.py (the real sets are here)"
        timeout $left $PY bench/real_data.py --mnist-epochs 1 --cifar-epochs 2 2>&1 | tee "$OUT/real-data.txt"
    fi
fi

echo "== summary"
echo "gpu: $(head -2 "$OUT/nvidia-smi.txt" | tail -1)"
echo "gpu tests (rc $tests_rc): $(grep -E '(passed|failed|skipped|error)' "$OUT/gpu-tests.txt" | tail -1)"
echo "throughput (rc $bench_rc):"
grep -E '^(device|workload|mlp|cnn|resnet|lstm|transformer|summary)' "$OUT/throughput.txt" | sed 's/^/  /'
echo "took $(($(date +%s) - started)) s; logs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
