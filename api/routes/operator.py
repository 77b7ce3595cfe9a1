"""GET /metrics: the API's view for Prometheus: jobs and studies by status, queue depth, and how
long submissions take. Read at scrape time from PostgreSQL and the broker (one
GROUP BY and one queue declare per scrape), so every API replica reports the same
numbers and none keeps counters that a restart would reset.

Behind a server-admin key (as the Kubernetes API server's /metrics is behind RBAC): it
counts every project's work, and the API port is public. Prometheus sends the key as a
bearer token (deploy/prometheus.yml).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.deps import server_admin_caller
from api.schemas import ADMIN_RESPONSES
from jobs.db import session_scope
from jobs.models import Job, Study
from jobs.pools import known_pools, pool_states
from jobs.queue import queue_depths
from jobs.states import JobStatus, StudyStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
registry = CollectorRegistry()

SUBMISSION_SECONDS = Histogram(
    "descent_job_submission_seconds",
    "Time to answer POST /v1/jobs: validation, the row committed, the message sent.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=registry,
)


class JobStateCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("descent_jobs", "Jobs by status (PostgreSQL).", labels=["status"])
        try:
            with session_scope() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in JobStatus:
                jobs.add_metric([status.value], counts.get(status.value, 0))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one source is down
            log.warning("metrics: could not count jobs: %s", type(exc).__name__)
        yield jobs
        studies = GaugeMetricFamily("descent_studies", "Studies by status (PostgreSQL).", labels=["status"])
        try:
            with session_scope() as session:
                counts = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            for status in StudyStatus:
                studies.add_metric([status.value], counts.get(status.value, 0))
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: could not count studies: %s", type(exc).__name__)
        yield studies
        depth = GaugeMetricFamily("descent_queue_depth", "Job messages waiting in the broker (every pool's queue).")
        try:
            with session_scope() as session:
                pools = known_pools(pool_states(session=session))
            depth.add_metric([], sum(queue_depths(pools).values()))
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: could not read the queue depth: %s", type(exc).__name__)
        yield depth


registry.register(JobStateCollector())


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(server_admin_caller)],
    responses={200: {"content": {"text/plain": {}}}, **ADMIN_RESPONSES},
)
def metrics() -> Response:
    """Prometheus text format; needs a server-admin key."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
