"""One MLflow run per job, always addressed by explicit id (never the fluent
active-run stack, which outlives a crashed task in the same process)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # no display on a worker
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import (  # noqa: E402
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunStatus,
)
from mlflow.models import Model  # noqa: E402
from mlflow.models.model import MLMODEL_FILE_NAME  # noqa: E402
from mlflow.store.artifact.artifact_repo import ArtifactRepository  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import BAD_REQUEST, ErrorCode  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_USER  # noqa: E402

from jobs.db import session_scope  # noqa: E402
from worker.metrics_rule import EVERY_STEP, RULE_TAG  # noqa: E402
from worker.metrics_sink import MAX_METRICS_PER_BATCH, MetricPoint  # noqa: E402
from jobs.mlflow_tenancy import project_experiment_id  # noqa: E402
from jobs.models import DEFAULT_PROJECT  # noqa: E402
from jobs.settings import settings  # noqa: E402
from jobs.spec import (  # noqa: E402
    ImageDataset,
    JobSpec,
    SyntheticDataset,
    TokenSequenceDataset,
    UploadedDataset,
)
from jobs.access import key_name  # noqa: E402
from jobs.tracking import run_user, standard_run_tags  # noqa: E402
from trainer.reporting import TrainingResult  # noqa: E402
from worker.confusion_plot import confusion_png  # noqa: E402
from worker.dataset_cache import image_set_digest  # noqa: E402
from worker.diagnostic_figures import line_figure, plane_figure  # noqa: E402

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
DATASET_INPUT_TRIES = 3
MLFLOW_DIGEST_CHARS = 36  # the longest dataset digest MLflow stores


class RunFacts(NamedTuple):
    """What a job's end needs to know of its run; known without asking MLflow when this attempt opened it."""

    experiment_id: str
    run_id: str
    artifact_uri: str
    params: dict[str, str]
    user: str | None = None  # its `mlflow.user`, which its logged model names too


def read_run_facts(client: MlflowClient, run_id: str) -> RunFacts:
    run = client.get_run(run_id)
    return RunFacts(run.info.experiment_id, run_id, run.info.artifact_uri, dict(run.data.params),
                    run.data.tags.get(MLFLOW_USER))  # fmt: skip


def open_run(
    client: MlflowClient,
    spec: JobSpec,
    job_id: uuid.UUID,
    attempt: int,
    project: str = DEFAULT_PROJECT,
    extra_tags: dict[str, str] | None = None,
    submitted_by: uuid.UUID | None = None,
) -> RunFacts:
    """Create the job's run with searchable tags, and MLflow's own tags (source, user, the
    description its UI shows) in the same request; `describe_run` adds the params and the
    dataset. The caller records the run on the job in between, so that an attempt killed
    while describing it leaves a run the next attempt reopens, not an orphan.

    The description stays what the job was asked to do: its outcome (the run's status, its
    metrics) would cost one more request at every job's end, and the UI shows both anyway."""
    with session_scope() as session:  # `<project>/<experiment>`, made by Descent for this project only
        experiment_id = project_experiment_id(client, session, project, spec.experiment or settings.default_experiment)
        user = run_user(project, key_name(session=session, key_id=submitted_by))  # who submitted it
    tags = {  # a study's trial adds its parent run, study, configuration and seed (extra_tags)
        "descent.job_id": str(job_id),
        "descent.project": project,
        "descent.attempt": str(attempt),
        "optimizer": spec.optimizer.name,
        "schedule": spec.schedule.name,
        "dataset": spec.dataset.name,
        "model": spec.model.arch,
        "loss": str(spec.loss),
        RULE_TAG: EVERY_STEP,  # how its per-step metrics are logged; its sink retags a change
    }
    tags |= standard_run_tags(spec, project, user) | (extra_tags or {})
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    return RunFacts(experiment_id, run.info.run_id, run.info.artifact_uri, run_params(spec), user)


def unrecorded_run(
    client: MlflowClient, spec: JobSpec, job_id: uuid.UUID, project: str = DEFAULT_PROJECT
) -> tuple[str, str] | None:
    """The run an earlier attempt created but was killed before recording on the job (the
    moment between create_run's answer and the job's update): found by its descent.job_id
    tag, so the next attempt continues it instead of leaving it RUNNING beside a second one.
    One search, made only by an attempt after the first that finds no run on its job.
    (experiment id, run id), or None."""
    with session_scope() as session:
        experiment_id = project_experiment_id(client, session, project, spec.experiment or settings.default_experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`descent.job_id` = '{job_id}'",
                              max_results=1, order_by=["attributes.start_time ASC"])  # fmt: skip
    return (experiment_id, runs[0].info.run_id) if runs else None


def run_params(spec: JobSpec) -> dict[str, str]:
    return {key: value[:6000] for key, value in spec.flat_params().items()}


def describe_run(client: MlflowClient, run_id: str, spec: JobSpec, project: str = DEFAULT_PROJECT) -> None:
    """The spec as dotted params and the dataset as the run's input. Safe to repeat (same
    params, same input): an attempt that stopped half-way through is followed by one that
    sends them again."""
    params = [Param(key, value) for key, value in run_params(spec).items()]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])
    _log_dataset_input(client, run_id, dataset_input(spec, project))


def _log_dataset_input(client: MlflowClient, run_id: str, dataset: DatasetInput) -> None:
    """The run's dataset as its input. The first run of an experiment to log a dataset makes
    its row; two runs that start together race for that insert and MLflow answers the loser
    BAD_REQUEST (a unique violation). The row exists by then, so the next try only links it.
    Refused again, the run goes on without its input record: it is a description of the run,
    not a reason to open a second one (an exception here would leave this run open and the
    metric sink would open another). MLflow unreachable is raised as before."""
    for attempt in range(DATASET_INPUT_TRIES):
        try:
            client.log_inputs(run_id, datasets=[dataset])
            return
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(BAD_REQUEST):
                raise
            if attempt + 1 == DATASET_INPUT_TRIES:
                log.warning("run %s: MLflow refused its dataset input %s: %s", run_id, dataset.dataset.name, exc)
                return
            time.sleep(0.05 * (attempt + 1))


def dataset_input(spec: JobSpec, project: str) -> DatasetInput:
    """The job's dataset as the run's training input, whatever it is: an upload, a standard
    image set from the cache, or a bundled or generated set."""
    if isinstance(spec.dataset, UploadedDataset):
        return uploaded_dataset_input(spec.dataset, project)
    return builtin_dataset_input(spec)


def builtin_dataset_input(spec: JobSpec) -> DatasetInput:
    """A built-in set: the digest of an image set is its checksum table's (the same files, the
    same digest, on every worker); of a bundled or generated set, its spec's parameters (and the
    seed, which generates a synthetic set). The splits the job trains and validates on are the
    profile; subset, validation and augmentation are in the run's params."""
    dataset = spec.dataset
    n_train, n_val = spec.split_sizes
    if isinstance(dataset, ImageDataset):
        digest = image_set_digest(dataset.name)
        source = {"builtin": dataset.name, "reader": "torchvision", "datasets_dir": str(settings.datasets_dir),
                  "checksums_sha256": digest}  # fmt: skip
    else:
        generated = isinstance(dataset, (SyntheticDataset, TokenSequenceDataset))
        recipe = {"spec": dataset.model_dump(mode="json")} | ({"seed": spec.seed} if generated else {})
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        source = {"builtin": dataset.name, "reader": "scikit-learn" if not generated else "descent"} | recipe
    profile = {"num_rows": n_train + n_val, "num_features": dataset.n_features, "train_samples": n_train,
               "validation_samples": n_val}  # fmt: skip
    entity = Dataset(
        name=dataset.name,
        digest=digest[:MLFLOW_DIGEST_CHARS],
        source_type="descent",
        source=json.dumps(source),
        schema=json.dumps({"shape": list(spec.input_shape.dims), "n_classes": dataset.n_classes}),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def uploaded_dataset_input(dataset: UploadedDataset, project: str) -> DatasetInput:
    """The upload as the run's training input: its digest is the file's SHA-256 (cut to the
    MLflow limit, MLFLOW_DIGEST_CHARS); the whole hash and the id are in the source."""
    entity = Dataset(
        name=dataset.name or dataset.id,
        digest=dataset.sha256[:MLFLOW_DIGEST_CHARS],
        source_type="descent",
        source=json.dumps({"dataset_id": dataset.id, "project": project, "sha256": dataset.sha256}),
        schema=json.dumps({"shape": dataset.shape, "n_classes": dataset.n_classes}),
        profile=json.dumps({"num_rows": dataset.n_samples, "num_features": dataset.n_features}),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def reopen_run(client: MlflowClient, run_id: str, attempt: int) -> None:
    """A later attempt continues the job's run (the reaper may have ended it FAILED)."""
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    client.set_tag(run_id, "descent.attempt", str(attempt))


def latest_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{metric: highest step MLflow has}. Points of one metric are sent in step order,
    so every step up to it is there: a resumed attempt skips those."""
    return {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}


RESULT_UPLOAD_THREADS = 8  # the end's files go at once: each PUT is mostly a wait on the server


class _Upload(NamedTuple):
    repository: ArtifactRepository
    local_file: Path
    artifact_dir: str | None


def log_results(
    client: MlflowClient, run_id: str, spec: JobSpec, result: TrainingResult, run: RunFacts | None = None,
    evaluation: Sequence[MetricPoint] = (),
) -> None:
    """The spec, the confusion matrix (data and figure), the diagnostics and (optionally)
    the model, at the end of a job. The job says `succeeded` only once they are in, so
    this is every job's fixed cost, and a study's pays it once a round. So everything is
    made locally (while the model's record is made) and then sent at once: every file, the
    run's and the model's, PUT from a few threads, instead of MLflow's one file after
    another with a lookup before each group (12 requests one after another). `run`, when
    this attempt opened the run, spares reading it back. `evaluation`: the run's last points
    (metrics_sink.last_points_at the model's step), of which the model's own are linked to it
    (model_metrics). The first failure is raised."""
    if run is None or run.run_id != run_id:
        run = read_run_facts(client, run_id)
    tracking_uri = client.tracking_uri
    hessian = result.diagnostics.get("hessian")
    if hessian is not None:
        client.set_tag(run_id, "descent.hessian_verdict", hessian["verdict"])
    with tempfile.TemporaryDirectory(prefix="job-results-") as directory, \
            ThreadPoolExecutor(RESULT_UPLOAD_THREADS, thread_name_prefix="mlflow-results") as pool:  # fmt: skip
        local = Path(directory)
        record = None
        if settings.log_model:  # the model's record is made while its files and the run's are written
            record = pool.submit(client.create_logged_model, run.experiment_id, name="model", source_run_id=run_id,
                                 params=run.params, tags={MLFLOW_USER: run.user} if run.user else None)  # fmt: skip
        run_repository = get_artifact_repository(run.artifact_uri, tracking_uri=tracking_uri)
        sent = [pool.submit(_put, upload) for upload in _run_files(local / "run", run_repository, spec, result)]
        model_id = None
        try:
            if record is not None:
                description = _save_model(local / "model", result)
                logged = record.result()
                model_id = logged.model_id
                sent += [pool.submit(_put, upload) for upload in _model_files(client, local / "model", description,
                                                                              logged, run_id)]  # fmt: skip
                output = LoggedModelOutput(model_id, step=result.steps)
                sent.append(pool.submit(client.log_outputs, run_id, models=[output]))  # the model as the run's output
                if linked := model_metrics(spec, model_id, evaluation):
                    sent.append(pool.submit(client.log_batch, run_id, metrics=linked))
            for future in sent:
                future.result()
        except Exception:
            if model_id is not None:  # as mlflow's log_model leaves a model whose files did not all arrive
                _finalize_quietly(client, model_id, LoggedModelStatus.FAILED)
            raise
    if model_id is not None:
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)


MODEL_METRIC_PREFIX = "val_"  # the model's metrics: its evaluation on the validation split


def model_metrics(spec: JobSpec, model_id: str, evaluation: Sequence[MetricPoint]) -> list[Metric]:
    """The final model's metrics, linked to its LoggedModel and the run's dataset: the run's
    points of its validation metrics (val_loss, val_accuracy; per class with
    diagnostics.per_class) at the step the model was saved, sent again exactly as the run has
    them (key, value, time, step) with the model's id. MLflow keeps the one point in the run
    and links it to the model (what `log_model` does after reading back every metric's
    history, here with the points in hand): one request, no extra point on the run's curves."""
    dataset = dataset_input(spec, project="").dataset  # its name and digest (the project is only in its source)
    return [
        Metric(key, value, timestamp, step, model_id=model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
        for key, value, timestamp, step in evaluation
        if key.startswith(MODEL_METRIC_PREFIX)
    ][:MAX_METRICS_PER_BATCH]


def _finalize_quietly(client: MlflowClient, model_id: str, status: LoggedModelStatus) -> None:
    try:
        client.finalize_logged_model(model_id, status)
    except Exception as exc:  # noqa: BLE001 - MLflow down: the model stays PENDING, the cause is raised
        log.warning("could not mark model %s %s: %s", model_id, status, exc)


def _put(upload: _Upload) -> None:
    upload.repository.log_artifact(str(upload.local_file), upload.artifact_dir)


def _run_files(directory: Path, repository: ArtifactRepository, spec: JobSpec, result: TrainingResult) -> list[_Upload]:
    """The run's own files, written under `directory` as they will be named in the run."""
    files: dict[str, bytes] = {
        "spec.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode(),
        "confusion_matrix.json": _json({"labels": result.class_names, "matrix": result.confusion_matrix}),
        "confusion_matrix.png": confusion_png(result.confusion_matrix, result.class_names),
    }
    if result.diagnostics:
        files["diagnostics/summary.json"] = _json(result.diagnostics)
    if result.landscape is not None:
        files["diagnostics/landscape.json"] = _json(result.landscape)
        for key, draw in (("line", line_figure), ("plane", plane_figure)):
            if key in result.landscape:
                fig = draw(result.landscape[key])
                try:
                    buffer = io.BytesIO()
                    fig.savefig(buffer, format="png")
                finally:
                    plt.close(fig)
                files[f"diagnostics/landscape_{'1d' if key == 'line' else '2d'}.png"] = buffer.getvalue()
    uploads = []
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        uploads.append(_Upload(repository, path, posixpath.dirname(name) or None))
    return uploads


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()  # as MlflowClient.log_dict writes it


def _save_model(directory: Path, result: TrainingResult) -> Model:
    """The model saved under `directory` as `mlflow.pytorch.log_model` saves it, before its
    LoggedModel exists (its ids go into MLmodel once it does: `_model_files`).

    Not `log_model` itself: given the run (or the fluent API's active run), MLflow reads
    every metric's whole history to tag the points of one step with the model (one
    request a metric, each as long as the run); given a model id instead, it looks the
    model up twice and sends its files one after another."""
    import mlflow.pytorch

    model = result.model.to("cpu").eval()
    description = Model()
    mlflow.pytorch.save_model(model, directory, mlflow_model=description, **model_save_options(model))
    return description


def _model_files(
    client: MlflowClient, directory: Path, description: Model, logged: LoggedModel, run_id: str
) -> list[_Upload]:
    """The saved model's files to send to its LoggedModel, its MLmodel now naming it."""
    description.artifact_path, description.run_id = logged.artifact_location, run_id
    description.model_uuid = description.model_id = logged.model_id
    description.save(str(directory / MLMODEL_FILE_NAME))
    repository = get_artifact_repository(logged.artifact_location, tracking_uri=client.tracking_uri)
    return [
        _Upload(repository, path, posixpath.dirname(path.relative_to(directory).as_posix()) or None)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]


def model_save_options(model: torch.nn.Module) -> dict[str, Any]:
    """How a job's model is saved, here and in the worker's warm-up (worker/job_processes.py).

    pickle: it skips the slow torch.export path of the default 'pt2' format. The
    requirements are stated, not inferred: inference runs the model in a subprocess
    (~4 s a job). The trainer package goes with a model only when the model holds its
    classes (sequence and transformer models, token readers): a pickle needs their
    code wherever it is loaded, while a model of torch's own layers loads with torch
    alone, and each file of the package is one more upload at the end of the job.
    """
    import trainer

    own_classes = any(not type(module).__module__.startswith("torch.") for module in model.modules())
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if any(type(module).__module__.startswith("torchvision.") for module in model.modules()):
        from trainer.vision import torchvision  # the resnet's blocks are torchvision's: its pickle needs them

        requirements.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    return {
        "serialization_format": "pickle",
        "pip_requirements": requirements,
        "code_paths": [str(Path(trainer.__file__).parent)] if own_classes else None,
    }
