"""The processes jobs run in (worker/job_processes.py, wired by worker/app.py): a job's
torch and BLAS threads, the parent's warm-up before it forks, whether children are reused,
and how a model is saved so that it loads where it is needed.

Thread limits and imports are process-wide, so those checks run in a fresh interpreter
that goes through the worker's own Celery signal handlers, as a worker does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jobs.settings import Settings
from launcher.processes import worker_command
from launcher.stack import stack_env
from tests.unit.conftest import REPO_ROOT
from worker import job_processes
from worker.mlflow_run import model_save_options


def run_python(code: str, **env: str | None) -> dict:
    """Runs `code` in a fresh interpreter with `env` (None: unset) and returns its last line, as JSON."""
    environment = {k: v for k, v in (os.environ | {"PYTHONPATH": str(REPO_ROOT)} | env).items() if v is not None}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env=environment, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# A worker's start, as Celery runs it: worker_init in the parent (the concurrency is
# known), then the pool forks a child, which gets worker_process_init; a job runs there.
WORKER_START_AND_A_CHILD = """
    import json, os, sys
    class Worker:  # what worker_init's sender tells: the worker's concurrency
        concurrency = {concurrency}
    from celery.signals import worker_init, worker_process_init
    import worker.app
    worker_init.send(sender=Worker())
    warmed = {{name: name in sys.modules for name in ("torch._dynamo", "mlflow.pytorch")}}
    from jobs import study_search  # built before the fork, holding no connection a child would share
    built = study_search.storage.cache_info().currsize == 1
    warmed["optuna storage"] = built and study_search.storage().engine.pool.checkedin() == 0
    pid = os.fork()
    if pid == 0:
        import numpy, torch
        from threadpoolctl import threadpool_info
        worker_process_init.send(sender="test")
        numpy.ones((64, 64)) @ numpy.ones((64, 64))  # BLAS loaded and used, as a job's numpy would
        blas = sorted({{p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}})
        with open("{out}", "w") as f:
            json.dump({{"torch": torch.get_num_threads(), "blas": blas,
                        "cuda_initialised": torch.cuda.is_initialized()}}, f)
        os._exit(0)
    os.waitpid(pid, 0)
    with open("{out}") as f:
        child = json.load(f)
    recycling = worker.app.celery_app.conf.worker_max_tasks_per_child
    print(json.dumps(child | {{"warmed": warmed, "max_tasks_per_child": recycling}}))
"""


def test_the_settings_set_a_jobs_torch_and_blas_threads_and_its_process_per_job(tmp_path: Path) -> None:
    out = tmp_path / "child.json"
    seen = run_python(WORKER_START_AND_A_CHILD.format(concurrency=2, out=out), TORCH_THREADS_PER_JOB="3",
                      FRESH_PROCESS_PER_JOB="true")  # fmt: skip
    assert seen["torch"] == 3
    assert seen["blas"] == [3]
    assert seen["max_tasks_per_child"] == 1


def test_by_default_a_job_gets_its_share_of_cores_in_a_warm_child_that_may_run_more_jobs(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    out = tmp_path / "child.json"
    seen = run_python(WORKER_START_AND_A_CHILD.format(concurrency=cores, out=out), TORCH_THREADS_PER_JOB="0",
                      FRESH_PROCESS_PER_JOB=None)  # fmt: skip
    assert seen["torch"] == 1 and seen["blas"] == [1]  # as many jobs as cores: one thread each
    # The parent imported what every job would, before forking, and left CUDA alone.
    assert seen["warmed"] == {"torch._dynamo": True, "mlflow.pytorch": True, "optuna storage": True}
    assert seen["cuda_initialised"] is False
    # A child runs one job only where a job can use CUDA (its exit returns the GPU memory).
    assert seen["max_tasks_per_child"] == (1 if torch.backends.cuda.is_built() else None)
    # The command line would override the worker's choice, so it does not set it.
    assert not any(arg.startswith("--max-tasks-per-child") for arg in worker_command(Settings()))


def test_threads_per_job_default_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_processes, "cores_available", lambda: 16)
    monkeypatch.setattr(job_processes.settings, "torch_threads_per_job", 0)
    assert [job_processes.threads_per_job(c) for c in (1, 2, 3, 4, 32)] == [16, 8, 5, 4, 1]
    monkeypatch.setattr(job_processes.settings, "torch_threads_per_job", 6)
    assert job_processes.threads_per_job(4) == 6
    assert stack_env(Settings(torch_threads_per_job=6))["TORCH_THREADS_PER_JOB"] == "6"


def test_a_model_of_torch_layers_is_saved_without_the_trainer_package_and_loads_without_it(tmp_path: Path) -> None:
    import mlflow.pytorch

    from jobs.spec import JobSpec
    from trainer.models import MODEL_BUILDERS

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    assert model_save_options(mlp)["code_paths"] is None
    mlflow.pytorch.save_model(mlp, tmp_path / "mlp", **model_save_options(mlp))
    loaded = run_python(f"""
        import json, sys
        sys.modules["trainer"] = None  # the trainer package cannot be imported here
        import mlflow.pytorch, torch
        model = mlflow.pytorch.load_model("{tmp_path / 'mlp'}")
        print(json.dumps({{"outputs": list(model(torch.zeros(2, 4)).shape)}}))
    """)  # fmt: skip
    assert loaded["outputs"] == [2, 3]

    spec = JobSpec.model_validate({"name": "x", "dataset": {"name": "sequence_memory"}, "model": {"arch": "lstm"}})
    from trainer.data import load_split

    data = load_split(spec, torch.device("cpu"))
    recurrent = MODEL_BUILDERS["lstm"](spec.model, data.shape, data.n_classes)
    assert model_save_options(recurrent)["code_paths"] == [str(REPO_ROOT / "trainer")]


def test_a_resnet_is_saved_with_the_trainer_package_and_torchvision_and_loads(tmp_path: Path) -> None:
    import mlflow.pytorch

    from jobs.shapes import ImageShape
    from jobs.spec import MODELS
    from trainer.models import MODEL_BUILDERS
    from trainer.vision import torchvision

    model = MODEL_BUILDERS["resnet"](MODELS["resnet"](arch="resnet", width=0.125), ImageShape(1, 8, 8), 3)
    options = model_save_options(model)
    assert options["code_paths"] == [str(REPO_ROOT / "trainer")]
    assert options["pip_requirements"][1] == f"torchvision=={torchvision.__version__.split('+')[0]}"
    mlflow.pytorch.save_model(model, tmp_path / "resnet", **options)
    loaded = run_python(f"""
        import json
        import mlflow.pytorch, torch
        model = mlflow.pytorch.load_model("{tmp_path / 'resnet'}").eval()
        print(json.dumps({{"outputs": list(model(torch.zeros(2, 1, 8, 8)).shape)}}))
    """)  # fmt: skip
    assert loaded["outputs"] == [2, 3]


def trained_iris_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str):  # noqa: ANN201
    """A local MLflow store (SQLite) that the worker's MLflow code uses, an empty run in it, and
    a 1-epoch iris job trained in-process: (client, spec, experiment id, run id, result)."""
    from mlflow.tracking import MlflowClient

    from jobs.spec import JobSpec
    from trainer.recipe import Trainer
    from worker import mlflow_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setattr(mlflow_run.settings, "mlflow_tracking_uri", uri)
    client = MlflowClient(tracking_uri=uri)
    spec = JobSpec.model_validate({"name": name, "dataset": {"name": "iris"}, "epochs": 1, "batch_size": 16})
    experiment_id = client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    trainer = Trainer(spec)
    trainer.setup()
    return client, spec, experiment_id, run_id, trainer.train()


def test_a_jobs_results_are_all_in_its_run_and_its_model_is_the_runs_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """log_results sends its parts at once and the model by ids: the run still ends up with
    the spec, the confusion matrix (data and figure) and a LoggedModel of its own."""
    import mlflow.pytorch

    from worker import mlflow_run

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "results")
    uri = client.tracking_uri
    # (the run's params: the spec's, sent by the job's metric sink with its points, which may
    # come after the results of an attempt that reopened the run: the model takes the spec's)
    params = mlflow_run.run_params(spec)

    mlflow_run.log_results(client, run_id, spec, result)

    assert {"spec.yaml", "confusion_matrix.json", "confusion_matrix.png"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    [logged] = client.search_logged_models(experiment_ids=[experiment_id])
    assert logged.source_run_id == run_id and logged.params == params and params["optimizer.name"] == "adam"
    assert str(logged.status) == "READY"
    assert {"MLmodel", "data", "requirements.txt"} <= {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    mlflow.set_tracking_uri(uri)
    from mlflow.models import Model

    description = Model.load(f"models:/{logged.model_id}")  # its MLmodel names it, as log_model's does
    assert (description.model_id, description.run_id) == (logged.model_id, run_id)
    assert description.artifact_path == logged.artifact_location
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert model(torch.zeros(2, 4)).shape == (2, 3)


def test_a_file_for_the_artifact_server_is_put_from_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of the stack's server keeps its files under `mlflow-artifacts:/` (MLflow's
    MlflowArtifactsRepository, a subclass of its HTTP repository): each file is one PUT of
    the bytes in hand, no scratch directory (an exact type test sent all of them through one)."""
    import requests
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from worker import mlflow_run

    sent = []

    def http_request(host_creds, endpoint, method, data=None, extra_headers=None, **kwargs):  # noqa: ANN001, ANN003
        sent.append((host_creds.host, endpoint, method, data, extra_headers["Content-Type"]))
        response = requests.Response()
        response.status_code = 200
        return response

    monkeypatch.setattr(mlflow_run, "http_request", http_request)
    monkeypatch.setattr(mlflow_run.tempfile, "TemporaryDirectory", lambda **_: pytest.fail("went through a file"))
    repository = get_artifact_repository("mlflow-artifacts:/1/abc/artifacts", tracking_uri="http://127.0.0.1:5000")
    mlflow_run._put(mlflow_run._Upload(repository, "data/model.pth", b"weights"))
    assert sent == [("http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts", "/data/model.pth",
                     "PUT", b"weights", "application/octet-stream")]  # fmt: skip


@pytest.mark.parametrize("arch", ["mlp", "lstm"])
def test_a_model_saved_from_the_template_is_what_mlflows_own_save_writes(tmp_path: Path, arch: str) -> None:
    """A job's model is pickled into the files `mlflow.pytorch.save_model` made once for its
    options (worker/mlflow_run.model_template): the same files, the same environment and
    flavors in MLmodel, and it loads as MLflow's own save does, with or without the trainer
    package (an LSTM needs it)."""
    import types

    import mlflow.pytorch
    import yaml

    from worker import mlflow_run

    if arch == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        example = "torch.zeros(2, 4)"
    else:
        from jobs.spec import JobSpec
        from trainer.data import load_split
        from trainer.models import MODEL_BUILDERS

        spec = JobSpec.model_validate({"name": "x", "dataset": {"name": "sequence_memory"}, "model": {"arch": "lstm"}})
        data = load_split(spec, torch.device("cpu"))
        model = MODEL_BUILDERS["lstm"](spec.model, data.shape, data.n_classes)
        example = "torch.zeros(2, 12, dtype=torch.long)"
    mlflow.pytorch.save_model(model, tmp_path / "mlflow", **model_save_options(model))
    mlflow_run.model_template(model)  # made once; this job's save below uses it
    saved = mlflow_run._save_model(types.SimpleNamespace(model=model))
    ours = tmp_path / "ours"
    for name, content in (saved.files | {"MLmodel": saved.description.to_yaml().encode()}).items():
        (ours / name).parent.mkdir(parents=True, exist_ok=True)
        (ours / name).write_bytes(content)

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}  # fmt: skip

    theirs, mine = files(tmp_path / "mlflow"), files(ours)
    assert theirs.keys() == mine.keys()
    assert all(theirs[name] == mine[name] for name in theirs if name not in ("MLmodel", "data/model.pth"))
    description, expected = yaml.safe_load(mine["MLmodel"]), yaml.safe_load(theirs["MLmodel"])
    own = ("utc_time_created", "model_uuid", "model_size_bytes")
    assert {k: v for k, v in description.items() if k not in own} == {k: v for k, v in expected.items() if k not in own}
    assert description["model_size_bytes"] == sum(len(data) for name, data in mine.items() if name != "MLmodel")
    outputs = run_python(f"""
        import json, sys
        import mlflow.pytorch, torch
        torch.manual_seed(0)
        x = {example}
        a, b = (mlflow.pytorch.load_model(path).eval()(x) for path in ("{tmp_path / 'mlflow'}", "{ours}"))
        print(json.dumps({{"equal": bool(torch.equal(a, b)), "shape": list(a.shape)}}))
    """)  # fmt: skip
    assert outputs["equal"] and outputs["shape"][0] == 2


def test_mlflow_asks_whether_it_runs_on_databricks_once_and_sends_the_same_headers() -> None:
    from mlflow.tracking.request_header import registry
    from mlflow.tracking.request_header.databricks_request_header_provider import DatabricksRequestHeaderProvider

    from jobs.mlflow_headers import ask_databricks_once

    before = registry.resolve_request_headers()
    ask_databricks_once()
    assert not any(isinstance(p, DatabricksRequestHeaderProvider) for p in registry._request_header_provider_registry)
    assert registry.resolve_request_headers() == before


def test_many_threads_asking_at_once_drop_the_databricks_check_once_without_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The API makes tracking clients in its thread pool, many at once: two threads removing
    # the same provider from MLflow's list made a metrics read fail (a 503, seen in CI).
    import threading

    from mlflow.tracking.request_header import registry
    from mlflow.tracking.request_header.databricks_request_header_provider import DatabricksRequestHeaderProvider

    from jobs import mlflow_headers

    providers = registry._request_header_provider_registry._registry
    monkeypatch.setattr(registry._request_header_provider_registry, "_registry",
                        [*providers, DatabricksRequestHeaderProvider()])  # fmt: skip
    monkeypatch.setattr(mlflow_headers, "_asked", False)
    start, errors = threading.Barrier(16), []

    def ask() -> None:
        start.wait()
        try:
            mlflow_headers.ask_databricks_once()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert not any(isinstance(p, DatabricksRequestHeaderProvider) for p in registry._request_header_provider_registry)


POOL_CHECK = """
    import http.server, json, logging, threading, time
    from concurrent.futures import ThreadPoolExecutor
    if {descent}:
        import jobs.tracking  # its MLflow client settings, as every Descent process has them
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_PUT(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.2)
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{{}}")
        def log_message(self, *args): pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    discarded = []
    class Catch(logging.Handler):
        def emit(self, record):
            if "Connection pool is full" in record.getMessage(): discarded.append(record)
    logging.getLogger("urllib3.connectionpool").addHandler(Catch())
    creds = get_default_host_creds(f"http://127.0.0.1:{{server.server_address[1]}}")
    with ThreadPoolExecutor(16) as pool:  # a pack's two trials ending at once, 8 upload threads each
        list(pool.map(lambda i: http_request(creds, f"/f{{i}}", "PUT", data=b"x"), range(32)))
    print(json.dumps({{"discarded": len(discarded)}}))
"""


def test_a_packs_result_uploads_keep_their_connections_to_mlflow() -> None:
    # MLflow's client keeps 10 connections per host: a pack's two trials ending at once send
    # from 16 threads, and urllib3 discarded the connections beyond 10 ("Connection pool is
    # full"), opening new ones for the next job. Descent's client settings keep them.
    assert run_python(POOL_CHECK.format(descent=False), MLFLOW_HTTP_POOL_MAXSIZE=None)["discarded"] > 0
    assert run_python(POOL_CHECK.format(descent=True), MLFLOW_HTTP_POOL_MAXSIZE=None)["discarded"] == 0
