"""MLflow for the job domain (torch-free): links to runs, metric histories, how a run ends."""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from mlflow.entities import LoggedModelStatus, RunStatus, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER
from pydantic import BaseModel

from jobs.mlflow_headers import ask_databricks_once
from jobs.settings import settings
from jobs.spec import ImageDataset, JobSpec
from jobs.states import JobStatus

log = logging.getLogger(__name__)

# MLflow's client retries a failed request 7 times with exponential backoff (minutes).
# Descent retries on its own terms (the sink keeps points and backs off; the API answers
# 503 with Retry-After), so a down MLflow must fail fast here. The environment still wins.
for _name, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Ending a run would otherwise read the whole run back only to print its link to
    # stdout: one request more at the end of every job, for a line in the worker's log.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Connections kept per host by the client's one requests session (default 10): a pack
    # ends two trials at once, each sending its results from 8 threads (worker/mlflow_run.py,
    # RESULT_UPLOAD_THREADS), so 10 made urllib3 discard connections ("Connection pool is
    # full") and open new ones for the next job. Room for both, and the requests beside them.
    "MLFLOW_HTTP_POOL_MAXSIZE": "32",
}.items():
    os.environ.setdefault(_name, _value)


@lru_cache(maxsize=1)
def tracking_client() -> MlflowClient:
    ask_databricks_once()  # not before each request (jobs/mlflow_headers.py)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


# MLflow 3's UI opens in its GenAI view (traces, evaluations) unless told otherwise: the
# experiment's `mlflow.experimentKind` tag does not choose it (checked in headless Chromium,
# MLflow 3.17), the link's `workflowType` does. A Descent run is model training.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(experiment_id: str | None, run_id: str | None, tab: str = "model-metrics") -> str | None:
    """The run's page in the MLflow UI in the model-training view, opened on `tab` (a job's
    metric charts; "" for the overview, where a study's report is)."""
    if not (experiment_id and run_id and settings.mlflow_ui_url):
        return None
    page = f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/{tab}?{MODEL_TRAINING_VIEW}" if tab else f"{page}?{MODEL_TRAINING_VIEW}"


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order (then in the order it was logged)."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(p.step, p.value) for p in points]


def read_metric_histories(run_id: str) -> dict[str, list[dict[str, float]]]:
    """{metric: [{"step", "value"}, ...]} for every metric of the run, in step order."""
    client = tracking_client()
    keys = sorted(client.get_run(run_id).data.metrics)
    return {key: [{"step": s, "value": v} for s, v in metric_history(client, run_id, key)] for key in keys}


# How a job's run ends, whoever ends it (its worker, or the reaper for a lost one).
RUN_STATUS_OF_JOB = {
    JobStatus.succeeded: RunStatus.FINISHED,
    JobStatus.failed: RunStatus.FAILED,
    JobStatus.cancelled: RunStatus.KILLED,
    JobStatus.pruned: RunStatus.KILLED,  # stopped on purpose; the tag descent.pruned says why
}


def end_run(client: MlflowClient, run_id: str, job_status: JobStatus) -> None:
    """FINISHED, FAILED or KILLED with the job; never left RUNNING."""
    client.set_terminated(run_id, status=RunStatus.to_string(RUN_STATUS_OF_JOB[job_status]))


def drop_model_quietly(client: MlflowClient, model_id: str) -> None:
    """A model record that never got its model (its job stopped, or failed, before its end):
    deleted, as a record of nothing. MLflow unreachable: logged, the record stays PENDING."""
    try:
        client.delete_logged_model(model_id)
    except Exception as exc:  # noqa: BLE001 - the job's outcome does not depend on it
        log.warning("could not delete model record %s, which holds no model: %s", model_id, exc)


def drop_unfinished_models(client: MlflowClient, experiment_id: str, run_id: str) -> int:
    """Delete the run's model records still PENDING: made while an earlier attempt trained,
    that attempt died (or MLflow went away) before its model was in. Called where no attempt
    will finish them: a resumed attempt's end, the reaper ending a finished job's run."""
    # (by status here: MLflow's filter compares `status` with the number its store keeps)
    models = client.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")
    drafts = [model for model in models if model.status == LoggedModelStatus.PENDING]
    for model in drafts:
        client.delete_logged_model(model.model_id)
    return len(drafts)


# -- what MLflow's UI shows of a run and an experiment (its standard tags)

# MLflow 3's UI opens an experiment in its GenAI view (traces, evaluation runs) unless the
# experiment says it holds model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SOURCE_NAME = "descent"  # the job's own name is the run's name; the source is what made the run
MAX_NOTE_CHARS = 5000  # MLflow keeps tag values up to 8000 characters


def run_user(project: str, key_name: str | None) -> str:
    """MLflow's `mlflow.user` (its UI's "Created by"): who submitted the job, as
    `<key label> (<project>)` (the key's prefix when it has no label, access.key_name);
    the project alone when no key is recorded (the bootstrap key's jobs, jobs from before
    migration 0016)."""
    return f"{key_name} ({project})" if key_name else project


def source_run_tags() -> dict[str, str]:
    """What made the run (its UI's "Source"): a Descent job, for a job's run and a study's alike."""
    return {MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB), MLFLOW_SOURCE_NAME: SOURCE_NAME}


def standard_run_tags(spec: JobSpec, project: str, user: str | None = None) -> dict[str, str]:
    """MLflow's own run tags, for its UI's "Created by" (`user`, run_user; the project when
    not given), "Source" and "Description"."""
    return source_run_tags() | {MLFLOW_USER: user or project, MLFLOW_RUN_NOTE: run_note(spec, project)}


def run_note(spec: JobSpec, project: str) -> str:
    """One paragraph (markdown) saying what the job trains: its spec's main choices."""
    dataset = spec.dataset
    n_train, n_val = spec.split_sizes
    dataset_name = getattr(dataset, "name", "") or getattr(dataset, "id", "")
    if isinstance(dataset, ImageDataset) and dataset.val_fraction is None:
        validation = "validated on the official test split"
    else:
        validation = f"{dataset.val_fraction:.0%} held out of it for validation"
    if getattr(dataset, "subset", None) is not None:
        validation += f", a subset of {dataset.subset} training samples"
    note = (
        f"Descent job `{spec.name}` of project `{project}`: model {_with_choices(spec.model, 'arch', every=True)} "
        f"trained on {dataset_name} ({n_train} training / {n_val} validation samples, {validation}) "
        f"with {_with_choices(spec.optimizer, 'name')}, schedule {_with_choices(spec.schedule, 'name')}, "
        f"for {spec.epochs} epochs of batch size {spec.batch_size} ({spec.total_steps} steps), seed {spec.seed}."
    )
    return note[:MAX_NOTE_CHARS]


def _with_choices(part: BaseModel, kind_field: str, every: bool = False) -> str:
    """`adam (lr 0.001)`: the kind, then what the spec sets it to (the learning rate always;
    `every`: every field, defaults too -- a model's few fields are its shape)."""
    values = part.model_dump(mode="json", exclude_defaults=not every, exclude={kind_field})
    if "lr" in type(part).model_fields:
        values = {"lr": part.lr} | values  # type: ignore[attr-defined]
    choices = ", ".join(f"{key} {_plain(value)}" for key, value in values.items())
    return f"{getattr(part, kind_field)} ({choices})" if choices else str(getattr(part, kind_field))


def _plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_plain(v)}" for k, v in value.items()) + "}"
    return str(value)
