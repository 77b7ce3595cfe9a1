#!/usr/bin/env bash
# Wheels for a lent GPU machine with no network (run HERE, where PyPI answers; .whl/ is
# git-ignored and travels when the device call carries it). The machine's image has torch,
# torchvision, numpy, scipy, scikit-learn, pandas, pyarrow, pytest, requests; the GPU tests
# need pydantic on top. `--bench` adds what bench/throughput.py needs (MLflow and its
# server; large: check the total against the 64 MiB a device call may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl "$@"; }
get --no-deps pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
if [ "${1:-}" = "--bench" ]; then
    get "mlflow>=3.0,<4" "sqlalchemy>=2.0,<3" "alembic>=1.13" "fastapi>=0.165" "uvicorn>=0.29" httpx
fi
du -sh .whl
