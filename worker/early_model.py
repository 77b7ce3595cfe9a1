"""A job's model record (its LoggedModel, PENDING), made from a thread of its own while the job
trains, once its metric sink has opened the run. A short job's end is a chain of requests on
one MLflow server: the record was the first link, 40-80 ms behind the sink's last points.
Made early, the end only sends the model's files and marks it READY, and the sink sends the
final model's metrics linked to it in its own last request (MlflowMetricSink.link_waiting).

Only the record: sending the spec and the files every model shares early as well slowed the
training more than it shortened the end (`bench/job_cost.py`-style runs alternated on 2 cores:
API overhead 0.199 s with the record alone, 0.213 s with the spec too, 0.234 s with the shared
files too, 0.235 s with nothing early). Only for a run this attempt opened (a resumed attempt's
end makes its own, and deletes what an earlier attempt left PENDING: worker/execute.py), and
only for a job of its own: a study moves on once its trials have trained, so their ends
overlap its next trials already (worker/execute_pack.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from mlflow.entities import LoggedModel
from mlflow.tracking import MlflowClient

from jobs.settings import settings
from jobs.tracking import drop_model_quietly
from worker.metrics_sink import MlflowMetricSink
from worker.mlflow_run import RunFacts, create_model_record

log = logging.getLogger(__name__)

OPEN_WAIT_S = 600.0  # a run MLflow does not open in this long: the end makes the record
WAIT_SLICE_S = 0.1  # how often the thread looks whether the end has come while it waits for the run


class EarlyModelRecord:
    """One attempt's model record, on its way from the moment this is made."""

    def __init__(self, client: MlflowClient, sink: MlflowMetricSink, opened: list[RunFacts]) -> None:
        self._client, self._sink, self._opened = client, sink, opened
        self._lock = threading.Lock()  # between the thread starting its request and the end giving up on it
        self._started = False
        self._taken = False  # by the end, for the model: its fate is the end's then
        self._ended = threading.Event()  # the end has come: not started by then, never started
        self._record: Future[LoggedModel] = Future()
        threading.Thread(target=self._run, name="job-model-record", daemon=True).start()

    def _run(self) -> None:
        deadline = time.monotonic() + OPEN_WAIT_S
        while not self._sink.wait_open(WAIT_SLICE_S):
            if self._ended.is_set() or time.monotonic() > deadline:
                return
        with self._lock:
            if self._ended.is_set() or not self._opened:  # (not opened by this attempt: reopened)
                return
            self._started = True
        try:
            self._record.set_result(create_model_record(self._client, self._opened[0]))
        except BaseException as exc:  # noqa: BLE001 - handed to the end, which makes the record itself
            self._record.set_exception(exc)

    def take(self) -> LoggedModel | None:
        """At the job's end: the record (waited for, when its request is on its way), or None
        (not started: it never will be; failed: the end makes it)."""
        with self._lock:
            self._ended.set()
            self._taken = True
            if not self._started:
                return None
        try:
            return self._record.result(timeout=settings.mlflow_wait_at_end_s)
        except Exception as exc:  # noqa: BLE001 - the end makes the record itself
            log.warning("run %s: its model record was not made early (%s); its end makes it", self._sink.run_id, exc)
            return None

    def drop(self) -> None:
        """The attempt ends without a model (failed, cancelled, lost): a record made for it is
        deleted, unless the end took it for the model (then sending the model failed, and
        mlflow_run.log_results left it FAILED, as MLflow's log_model would)."""
        if self._taken:
            return
        record = self.take()
        if record is not None:
            drop_model_quietly(self._client, record.model_id)
