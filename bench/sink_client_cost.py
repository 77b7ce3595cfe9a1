"""What the metric sink's HTTP client costs the training process, in CPU time.

Trains the trainer_overhead job (digits, MLP [128, 64], Adam, batch 64, metrics every
step) three ways, rounds rotating the order: with no reporter; with the worker's
reporter and sink posting through requests (what the sink did before); and posting
over its kept-alive http.client connection (what it does now for plain http). The
server is a minimal HTTP/1.1 server in another process that reads each body and
answers 200, so the figures are the client's side only (a real MLflow server costs
~0.4 ms of CPU a point on its own host). Prints steps per CPU-second of the training
process (the sink's thread included) and the paired ratios against no reporter.

  PYTHONPATH=$PWD .venv/bin/python bench/sink_client_cost.py [--epochs 60] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402
from trainer.reporting import NullReporter  # noqa: E402
from worker.metrics_sink import MlflowMetricSink  # noqa: E402
from worker.monitor import JobReporter  # noqa: E402

SERVER = """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", PORT), Answer).serve_forever()
"""


class PlainHttpClient:
    """All the sink reads of an MlflowClient when its store is a server."""

    def __init__(self, port: int) -> None:
        self.tracking_uri = f"http://127.0.0.1:{port}"


def make_sink(port: int, client_kind: str) -> MlflowMetricSink:
    if client_kind == "requests":  # a proxy "applies": the sink keeps requests, as before this change
        real = requests.utils.get_environ_proxies
        requests.utils.get_environ_proxies = lambda url, no_proxy=None: {"http": "(none: forces requests)"}
        try:
            return MlflowMetricSink(PlainHttpClient(port), lambda: ("run", {}), 1.0, 10**7)  # type: ignore[arg-type]
        finally:
            requests.utils.get_environ_proxies = real
    return MlflowMetricSink(PlainHttpClient(port), lambda: ("run", {}), 1.0, 10**7)  # type: ignore[arg-type]


def cpu_per_step(spec: JobSpec, port: int, kind: str) -> float:
    sink = None if kind == "no reporter" else make_sink(port, kind)
    trainer = Trainer(spec, NullReporter() if sink is None else JobReporter(sink))
    trainer.setup()
    start = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - start
    if sink is not None:
        sink.close()
    return cpu / result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--port", type=int, default=5098)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(
        {"name": "bench", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
         "optimizer": {"name": "adam", "lr": 0.001}, "epochs": args.epochs, "batch_size": 64, "device": "cpu"}
    )  # fmt: skip
    server = subprocess.Popen([sys.executable, "-c", SERVER.replace("PORT", str(args.port))])
    try:
        time.sleep(2)
        kinds = ["no reporter", "requests", "http.client"]
        costs: dict[str, list[float]] = {k: [] for k in kinds}
        for kind in kinds:  # warm-up
            cpu_per_step(spec, args.port, kind)
        for round_ in range(args.rounds):
            for kind in kinds[round_ % 3 :] + kinds[: round_ % 3]:
                costs[kind].append(cpu_per_step(spec, args.port, kind))
    finally:
        server.kill()
    for kind in kinds:
        rounds = ", ".join(f"{1 / c:.0f}" for c in costs[kind])
        print(f"{kind:12s} {1 / statistics.median(costs[kind]):7.0f} steps per CPU-second   (rounds: {rounds})")
    for kind in kinds[1:]:
        ratio = statistics.median(a / b for a, b in zip(costs["no reporter"], costs[kind]))
        print(f"sink posting through {kind}: {ratio:.3f} of no reporter (median of paired rounds)")


if __name__ == "__main__":
    main()
