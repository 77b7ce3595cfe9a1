"""Celery tasks: glue around worker.execute."""

from __future__ import annotations

from jobs.queue import RUN_JOB_TASK
from worker.app import celery_app
from worker.execute import execute_job


@celery_app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> str:
    """Receives only the job id; PostgreSQL holds everything else."""
    return str(execute_job(job_id))
