"""A study run packed vs unpacked through the real stack (issue 13).

examples/studies/five-optimizers-digits.yaml (5 optimizers x 3 seeds, digits MLP) is
submitted twice to one stack (fresh PostgreSQL databases, a private Redis queue, an
`mlflow server`, the API, one worker with 2 job slots, all started by launcher.stack as
`make up` starts them): with `search.pack_size` 16 and with 1. Printed side by side: the
wall time from submission to the study's end, and the largest difference between the two
leaderboards' means (what packing must not change).

    PYTHONPATH=$PWD .venv/bin/python bench/packed_study.py [--epochs N] [--log-every-steps N]

Needs the local PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import bench_stack  # noqa: E402
from descent.specfile import load_spec  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "examples" / "studies" / "five-optimizers-digits.yaml"
CONCURRENCY = 2


def run_study(api: httpx.Client, body: dict, timeout_s: float = 3600) -> tuple[float, dict]:
    """(seconds from submission to the study's end, the ended study)."""
    started = time.perf_counter()
    response = api.post("/v1/studies", json=body)
    response.raise_for_status()
    study_id = response.json()["id"]
    while (study := api.get(f"/v1/studies/{study_id}").json())["status"] == "running":
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"study {study_id} still running after {timeout_s} s")
        time.sleep(0.1)
    return time.perf_counter() - started, study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the study's epochs (default: its own)")
    parser.add_argument("--log-every-steps", type=int, default=None,
                        help="the trials' log_every_steps (default: theirs, 1): per-step points cost the MLflow server")  # fmt: skip
    args = parser.parse_args()
    spec = load_spec(STUDY)
    if args.epochs:
        spec["base"]["epochs"] = args.epochs
    if args.log_every_steps:
        spec["base"]["log_every_steps"] = args.log_every_steps

    results: dict[int, tuple[float, dict]] = {}
    with bench_stack("packed-study", CONCURRENCY, api_timeout_s=60) as stack:
        for pack_size in (16, 1):
            body = copy.deepcopy(spec)
            body["name"] = f"{spec['name']}-pack{pack_size}"
            body["search"] = dict(body["search"]) | {"pack_size": pack_size}
            results[pack_size] = run_study(stack.api, body)

    (packed_s, packed), (alone_s, alone) = results[16], results[1]
    trials = sum(packed["trials"].values())
    print(f"study {spec['name']}: {trials} trials, {spec['base'].get('epochs')} epochs, "
          f"log_every_steps {spec['base'].get('log_every_steps', 1)}, one worker with "
          f"{CONCURRENCY} job slots, parallelism {spec['search'].get('parallelism')}")  # fmt: skip
    print(f"{'':24}{'pack_size 16':>14}{'pack_size 1':>14}")
    print(f"{'wall time (s)':24}{packed_s:>14.1f}{alone_s:>14.1f}")
    print(f"{'status':24}{packed['status']:>14}{alone['status']:>14}")
    print(f"{'packs':24}{len(packed['packs']):>14}{len(alone['packs']):>14}")
    rows = {r["config_id"]: r for r in alone["leaderboard"]["configurations"]}
    diffs = [abs(r["mean"] - rows[r["config_id"]]["mean"]) for r in packed["leaderboard"]["configurations"]
             if r["mean"] is not None and rows.get(r["config_id"], {}).get("mean") is not None]  # fmt: skip
    print(f"max leaderboard difference ({packed['leaderboard']['metric']} mean): {max(diffs):.2e}")
    print(f"wall time, packed vs unpacked: {alone_s / packed_s:.2f}x")


if __name__ == "__main__":
    main()
