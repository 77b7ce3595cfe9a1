"""`make demo`: start the embedded stack, train SGD, SGD with momentum and Adam on
`digits` through the REST API, print how they did, stop everything, exit 0."""

from __future__ import annotations

import sys
import time

import httpx

from jobs.settings import settings
from launcher.stack import local_api_key, start_stack

DEMO_JOBS = [
    {"name": "demo-sgd", "optimizer": {"name": "sgd", "lr": 0.05}},
    {"name": "demo-momentum", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    {"name": "demo-adam", "optimizer": {"name": "adam", "lr": 0.001},
     "schedule": {"name": "warmup_cosine", "warmup_steps": 50}},
]  # fmt: skip
COMMON = {"experiment": "demo", "dataset": {"name": "digits"}, "epochs": 20, "batch_size": 64, "seed": 0}
TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_for(client: httpx.Client, job_ids: list[str], timeout_s: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    last_done = -1
    while True:
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        if all(job["status"] in TERMINAL for job in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError("the demo jobs did not finish in time")
        done = sum(job["status"] in TERMINAL for job in jobs)
        if done != last_done:
            print(f"  {done}/{len(jobs)} done", flush=True)
            last_done = done
        time.sleep(0.5)


def print_table(jobs: list[dict]) -> None:
    print(f"\n{'job':<15} {'optimizer':<10} {'status':<10} {'val_accuracy':>12} {'val_loss':>9}  MLflow run")
    for job in jobs:
        m = job["metrics"]
        acc = f"{m['val_accuracy']:.4f}" if m.get("val_accuracy") is not None else "-"
        loss = f"{m['val_loss']:.4f}" if m.get("val_loss") is not None else "-"
        opt = job["spec"]["optimizer"]
        label = opt["name"] + ("+mom" if opt.get("momentum") else "")
        print(f"{job['name']:<15} {label:<10} {job['status']:<10} {acc:>12} {loss:>9}  {job['mlflow']['run_url']}")
        if job["error"]:
            print(f"  error: {job['error']['type']}: {job['error']['message']}")


def main() -> int:
    log_dir = settings.descent_home.resolve() / "logs"
    print(f"Starting the embedded stack (logs in {log_dir}/)...", flush=True)
    group = start_stack(settings, log_dir)
    try:
        key = local_api_key(settings)
        print(f"  API key (server admin): {key}")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30, headers=headers) as client:
            ids = []
            for job in DEMO_JOBS:
                response = client.post("/v1/jobs", json=COMMON | job)
                response.raise_for_status()
                ids.append(response.json()["id"])
                print(f"  submitted {job['name']}: {ids[-1]}")
            jobs = wait_for(client, ids)
        print_table(jobs)
        print(f"\nCompare the runs in the MLflow UI ({settings.mlflow_ui_url}) with `make up`.")
        return 0 if all(job["status"] == "succeeded" for job in jobs) else 1
    finally:
        group.stop_all()


if __name__ == "__main__":
    sys.exit(main())
