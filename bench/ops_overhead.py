"""What a job's operator views cost its training: MLflow system metrics (mlflow's
monitors sampled on our loop, written to a real MLflow store) and the worker's
Prometheus gauges (steps/s, GPU memory), against the same trainer without them.

Same spec, seed and process; rounds alternate which side goes first, and the figure
is the median of the paired ratios (this VM's speed drifts between seconds).

  .venv/bin/python bench/ops_overhead.py [--interval 10] [--epochs 200] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.tracking import MlflowClient  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from jobs.spec import JobSpec  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402
from worker.monitor import JobReporter  # noqa: E402
from worker.prometheus_metrics import JobMetrics, RunningJobGauges  # noqa: E402
from worker.system_metrics import JobSystemMetrics  # noqa: E402


def steps_per_second(spec: JobSpec, client: MlflowClient | None, interval_s: float, metrics: JobMetrics) -> float:
    reporter = JobReporter(None)
    trainer = Trainer(spec, reporter)
    trainer.setup()
    with contextlib.ExitStack() as views:
        if client is not None:
            run_id = client.create_run(client.create_experiment(f"ops-{time.time_ns()}")).info.run_id
            views.enter_context(JobSystemMetrics(client, lambda: run_id, lambda: reporter.step, interval_s))
            views.enter_context(RunningJobGauges("bench", lambda: reporter.step, metrics=metrics))
        started = time.perf_counter()
        result = trainer.train()
        return result.steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=10.0, help="system metrics interval (s)")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    spec = JobSpec.model_validate(
        {"dataset": {"name": "digits"}, "optimizer": {"name": "adam"}, "epochs": args.epochs, "batch_size": 64}
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tempfile.mkdtemp(prefix='ops-bench-')}/mlflow.db")
    metrics = JobMetrics(CollectorRegistry())
    ratios = []
    for i in range(args.rounds):
        sides = [None, client] if i % 2 == 0 else [client, None]
        speed = {id(side): steps_per_second(spec, side, args.interval, metrics) for side in sides}
        bare, viewed = speed[id(None)], speed[id(client)]
        ratios.append(viewed / bare)
        print(f"round {i}: without {bare:.0f} steps/s, with system metrics every {args.interval:g} s "
              f"and gauges {viewed:.0f} steps/s, ratio {viewed / bare:.3f}", flush=True)  # fmt: skip
    print(f"median ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
