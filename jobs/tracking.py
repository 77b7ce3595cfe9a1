"""MLflow for the job domain (torch-free): links to runs, metric histories, how a run ends."""

from __future__ import annotations

import os
from functools import lru_cache

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from jobs.settings import settings
from jobs.states import JobStatus

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
}.items():
    os.environ.setdefault(_name, _value)


@lru_cache(maxsize=1)
def tracking_client() -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def run_url(experiment_id: str | None, run_id: str | None) -> str | None:
    if not (experiment_id and run_id and settings.mlflow_ui_url):
        return None
    return f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


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
