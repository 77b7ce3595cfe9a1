"""One MLflow run per job, always addressed by explicit id (never the fluent
active-run stack, which outlives a crashed task in the same process)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
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
    RunStatus,
    RunTag,
)
from mlflow.environment_variables import MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE  # noqa: E402
from mlflow.models import Model  # noqa: E402
from mlflow.models.model import MLMODEL_FILE_NAME  # noqa: E402
from mlflow.store.artifact.artifact_repo import ArtifactRepository  # noqa: E402
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository  # noqa: E402
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import BAD_REQUEST, ErrorCode  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.credentials import get_default_host_creds  # noqa: E402
from mlflow.utils.mime_type_utils import _guess_mime_type  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_USER  # noqa: E402
from mlflow.utils.rest_utils import augmented_raise_for_status, http_request  # noqa: E402

from jobs.db import session_scope  # noqa: E402
from worker.metrics_rule import EVERY_STEP, RULE_TAG  # noqa: E402
from worker.metrics_sink import MAX_METRICS_PER_BATCH, MetricPoint, ModelLink  # noqa: E402
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

# libyaml's emitter where PyYAML has it (the same YAML, ~10x less CPU than the pure-Python one)
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
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
    description its UI shows) in the same request; `log_run_input` adds the dataset, and the
    metric sink the params (with its first points). The caller records the run on the job in
    between, so that an attempt killed while describing it leaves a run the next attempt
    reopens, not an orphan.

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
    """The spec as the run's dotted params. The job's metric sink sends them with its first
    points (worker/metrics_sink.py: one request fewer a job), again after every (re)opening:
    safe to repeat, the values are the same."""
    return {key: value[:6000] for key, value in spec.flat_params().items()}


def log_run_input(client: MlflowClient, run_id: str, spec: JobSpec, project: str = DEFAULT_PROJECT) -> None:
    """The dataset as the run's input. Safe to repeat (the same input): an attempt that
    stopped half-way through is followed by one that sends it again."""
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
    path: str  # under the repository's root: "spec.yaml", "data/model.pth"
    content: bytes


def create_model_record(client: MlflowClient, run: RunFacts) -> LoggedModel:
    """The job's LoggedModel, PENDING until its files are in: with the run's params and who
    submitted the job. Made while the job trains (worker/early_model.py), or by its end."""
    return client.create_logged_model(run.experiment_id, name="model", source_run_id=run.run_id, params=run.params,
                                      tags={MLFLOW_USER: run.user} if run.user else None)  # fmt: skip


def log_results(
    client: MlflowClient, run_id: str, spec: JobSpec, result: TrainingResult, run: RunFacts | None = None,
    evaluation: Callable[[], Sequence[MetricPoint]] | None = None, record: LoggedModel | None = None,
) -> None:
    """The spec, the confusion matrix (data and figure), the diagnostics and (optionally)
    the model, at the end of a job. The job says `succeeded` only once they are in, so
    this is every job's fixed cost, and a study's pays it once a round. So everything is
    made in memory (while the model's record is made) and then sent at once: every file, the
    run's and the model's, PUT from a few threads, instead of MLflow's one file after
    another with a lookup before each group (12 requests one after another). `run`, when
    this attempt opened the run, spares reading it back. `evaluation`: the run's last points
    (metrics_sink.last_points_at the model's step), returned once the run's metric sink has
    sent them (MlflowMetricSink.wait_delivered says why it must); the model's own are linked
    to it (model_metrics). `record`: the model's LoggedModel when it was made while the job
    trained (worker/early_model.py); else it is made here. The first failure is raised."""
    if run is None or run.run_id != run_id:
        # (the params from the spec: the run may not have them yet, its sink sends them with
        # its points, and they are the spec's whichever attempt sends them)
        run = read_run_facts(client, run_id)._replace(params=run_params(spec))
    tracking_uri = client.tracking_uri
    hessian = result.diagnostics.get("hessian")
    # The diagnosis's tag goes with the model's metrics (one request), or alone without a model.
    tags = [RunTag("descent.hessian_verdict", hessian["verdict"])] if hessian is not None else []
    with ThreadPoolExecutor(RESULT_UPLOAD_THREADS, thread_name_prefix="mlflow-results") as pool:
        made = None
        if settings.log_model and record is None:  # the record is made while its files and the run's are made
            made = pool.submit(create_model_record, client, run)
        run_repository = get_artifact_repository(run.artifact_uri, tracking_uri=tracking_uri)
        run_files = _run_files(spec, result)
        sent = [pool.submit(_put, _Upload(run_repository, name, content)) for name, content in run_files.items()]
        model_id, model_puts = None, []
        try:
            if settings.log_model:
                saved = _save_model(result)
                logged = record or made.result()
                model_id = logged.model_id
                model_puts = [pool.submit(_put, upload) for upload in _model_files(client, saved, logged, run_id)]
                output = LoggedModelOutput(model_id, step=result.steps)
                sent.append(pool.submit(client.log_outputs, run_id, models=[output]))  # the model as the run's output
                if evaluation is not None:
                    sent.append(pool.submit(_log_linked_metrics, client, run_id, spec, model_id, evaluation, tags))
                    tags = []
            if tags:
                sent.append(pool.submit(client.log_batch, run_id, tags=tags))
            # The model is READY once its own files are in, while the run's last requests are
            # on their way (its linked metrics wait for the sink's last points): not one more
            # request after them on the way to the job's end. Any failure still leaves it FAILED.
            for future in model_puts:
                future.result()
            if model_id is not None:
                client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            for future in sent:
                future.result()
        except Exception:
            if model_id is not None:  # as mlflow's log_model leaves a model whose files did not all arrive
                _finalize_quietly(client, model_id, LoggedModelStatus.FAILED)
            raise


def _log_linked_metrics(
    client: MlflowClient, run_id: str, spec: JobSpec, model_id: str,
    evaluation: Callable[[], Sequence[MetricPoint]], tags: list[RunTag],
) -> None:
    """The model's metrics (points the run has, or is being sent by its sink) and the tags
    that ride with them, once the sink is done with those points (`evaluation` returns
    then): never in flight beside the sink's request that carries them.

    Refused (BAD_REQUEST), it is sent again, a few times: it is idempotent (the same points
    and tags: MLflow skips the points it has, links each once, sets a tag to the same value),
    and the refusal it can still meet is MLflow losing a race with another request inserting
    the same point (MLflow unreachable past the wait, the sink's points still on their way),
    which is over once that request is: a job that trained is not failed for it."""
    linked = model_metrics(spec, model_id, evaluation())  # (MLflow unreachable: this request inserts them itself)
    if not linked and not tags:
        return
    for attempt in range(LINKED_METRICS_TRIES):
        try:
            client.log_batch(run_id, metrics=linked, tags=tags)
            return
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(BAD_REQUEST) or attempt + 1 == LINKED_METRICS_TRIES:
                raise
            log.warning("run %s: MLflow refused the model's metrics, sending them again: %s", run_id, exc)
            time.sleep(0.2 * (attempt + 1))


LINKED_METRICS_TRIES = 3


MODEL_METRIC_PREFIX = "val_"  # the model's metrics: its evaluation on the validation split


def model_metrics(spec: JobSpec, model_id: str, evaluation: Sequence[MetricPoint]) -> list[Metric]:
    """The final model's metrics, linked to its LoggedModel and the run's dataset: the run's
    points of its validation metrics (val_loss, val_accuracy; per class with
    diagnostics.per_class) at the step the model was saved, sent again exactly as the run has
    them (key, value, time, step) with the model's id. MLflow keeps the one point in the run
    and links it to the model (what `log_model` does after reading back every metric's
    history, here with the points in hand): one request, no extra point on the run's curves.
    (When the model's record was made while the job trained, its metric sink usually sends
    them linked in the first place: `model_points`, MlflowMetricSink.link_waiting.)"""
    link = model_link(spec, model_id)
    return [Metric(key, value, timestamp, step, *link) for key, value, timestamp, step in model_points(evaluation)]


def model_points(points: Sequence[MetricPoint]) -> list[MetricPoint]:
    """The final model's metrics among the run's points at its last step."""
    return [point for point in points if point[0].startswith(MODEL_METRIC_PREFIX)][:MAX_METRICS_PER_BATCH]


def model_link(spec: JobSpec, model_id: str) -> ModelLink:
    """What links a point to the model: its id, and the run's dataset's name and digest (the
    project is only in the dataset's source)."""
    dataset = dataset_input(spec, project="").dataset
    return model_id, dataset.name, dataset.digest


def _finalize_quietly(client: MlflowClient, model_id: str, status: LoggedModelStatus) -> None:
    try:
        client.finalize_logged_model(model_id, status)
    except Exception as exc:  # noqa: BLE001 - MLflow down: the model stays PENDING, the cause is raised
        log.warning("could not mark model %s %s: %s", model_id, status, exc)


def _put(upload: _Upload) -> None:
    """One file into its run or model. To MLflow's artifact server (`--serve-artifacts`, as
    Descent runs it) from memory, the request MLflow's HTTP repository makes from a file
    (writing a job's dozen files to a scratch directory first, and removing them, cost more
    than sending them); to any other store, or a file large enough that MLflow may upload it
    in parts (it decides), through a file and MLflow's own `log_artifact`.

    The artifact server's repository is `MlflowArtifactsRepository` (`mlflow-artifacts:/`
    URIs, what a run of the stack's server has), a subclass of HttpArtifactRepository whose
    uploads are the same PUT: an exact type test sent every file through a scratch directory."""
    repository = upload.repository
    may_go_in_parts = len(upload.content) >= MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE.get()
    if isinstance(repository, HttpArtifactRepository) and not may_go_in_parts:
        headers = {"Content-Type": _guess_mime_type(posixpath.basename(upload.path))}
        response = http_request(get_default_host_creds(repository.artifact_uri), posixpath.join("/", upload.path),
                                "PUT", data=upload.content, extra_headers=headers)  # fmt: skip
        augmented_raise_for_status(response)
        return
    with tempfile.TemporaryDirectory(prefix="job-result-") as directory:
        local_file = Path(directory) / posixpath.basename(upload.path)
        local_file.write_bytes(upload.content)
        repository.log_artifact(str(local_file), posixpath.dirname(upload.path) or None)


def _run_files(spec: JobSpec, result: TrainingResult) -> dict[str, bytes]:
    """The run's own files, {path in the run: content}."""
    files: dict[str, bytes] = {
        "spec.yaml": yaml.dump(spec.model_dump(mode="json"), Dumper=SAFE_DUMPER, sort_keys=False).encode(),
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
    return files


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()  # as MlflowClient.log_dict writes it


MODEL_DATA_FILE = "data/model.pth"  # where mlflow.pytorch's pickle format keeps the model itself


class _ModelTemplate(NamedTuple):
    """What `mlflow.pytorch.save_model` writes alike for every model saved with the same options:
    every file but the model's data and MLmodel (the environment files, the pickle module's
    name, the trainer package where it goes along), and MLmodel's flavors."""

    files: dict[str, bytes]  # {path in the model: content}
    description: Model


_model_templates: dict[tuple[Any, ...], _ModelTemplate] = {}


class SavedModel(NamedTuple):
    description: Model  # its MLmodel, completed with its LoggedModel's ids by `_model_files`
    files: dict[str, bytes]  # {path in the model: content}, but MLmodel


def _save_model(result: TrainingResult) -> SavedModel:
    """The model as `mlflow.pytorch.save_model` saves it, in memory, before its LoggedModel
    exists (its ids go into MLmodel once it does: `_model_files`).

    MLflow's own save runs once per process and set of options (`model_template`; the
    worker's parent makes the one for models of torch's layers before it forks): it spends
    ~5-10 ms of CPU on what is the same for every such model (the pip requirements checked
    against the installed packages, the Python environment read, the YAML files written);
    a job only pickles its model the way MLflow does and fills in its MLmodel's own fields.

    Not `log_model` itself: given the run (or the fluent API's active run), MLflow reads
    every metric's whole history to tag the points of one step with the model (one
    request a metric, each as long as the run); given a model id instead, it looks the
    model up twice and sends its files one after another."""
    import mlflow.pytorch

    model = result.model.to("cpu").eval()
    template = model_template(model)
    buffer = io.BytesIO()
    torch.save(model, buffer, pickle_module=mlflow.pytorch.pickle_module)
    files = template.files | {MODEL_DATA_FILE: buffer.getvalue()}
    description = copy.deepcopy(template.description)
    description.utc_time_created = str(datetime.now(timezone.utc).replace(tzinfo=None))  # as Model() stamps it
    description.model_size_bytes = sum(len(content) for content in files.values())
    return SavedModel(description, files)


def model_template(model: torch.nn.Module) -> _ModelTemplate:
    """This process's template for models saved with `model`'s options (made by MLflow's own
    `save_model` of the first such model, kept in memory)."""
    import mlflow.pytorch

    options = model_save_options(model)
    key = (tuple(options["pip_requirements"]), tuple(options["code_paths"] or ()))
    template = _model_templates.get(key)
    if template is None:
        with tempfile.TemporaryDirectory(prefix="model-template-") as scratch:
            saved = Path(scratch) / "model"
            description = Model()
            mlflow.pytorch.save_model(model, saved, mlflow_model=description, **options)
            files = {
                path.relative_to(saved).as_posix(): path.read_bytes()
                for path in sorted(saved.rglob("*"))
                if path.is_file() and "__pycache__" not in path.parts
            }
        for own in (MLMODEL_FILE_NAME, MODEL_DATA_FILE):
            if files.pop(own, None) is None:  # an MLflow whose pickle format changed: say so, not save it wrong
                raise RuntimeError(f"mlflow.pytorch.save_model no longer writes {own}: the model template must change")
        template = _model_templates[key] = _ModelTemplate(files, description)
    return template


def _model_files(client: MlflowClient, saved: SavedModel, logged: LoggedModel, run_id: str) -> list[_Upload]:
    """The saved model's files to send to its LoggedModel, its MLmodel now naming it."""
    description = saved.description
    description.artifact_path, description.run_id = logged.artifact_location, run_id
    description.model_uuid = description.model_id = logged.model_id
    repository = get_artifact_repository(logged.artifact_location, tracking_uri=client.tracking_uri)
    files = saved.files | {MLMODEL_FILE_NAME: description.to_yaml().encode()}
    return [_Upload(repository, path, content) for path, content in sorted(files.items())]


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
