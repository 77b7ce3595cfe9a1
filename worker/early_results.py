"""The results of a job that do not depend on its training (the run's spec, the model's record
and the files every such model shares: worker/mlflow_run.send_early), sent from a thread of
their own while the job trains, once its metric sink has opened the run. Its end takes what
they sent (`take`) and sends only the rest: a short job's end is a chain of requests on one
MLflow server, and these were a third of it.

Only for a run this attempt opened: a resumed attempt's end sends everything, as before, and
deletes what an earlier attempt left PENDING (worker/execute.py). Only for a job of its own,
not a study's trial: a study moves on once its trials have trained, so their ends overlap its
next trials already, and the requests made while they trained slowed them (worker/execute_pack.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import torch
from mlflow.tracking import MlflowClient

from jobs.settings import settings
from jobs.spec import JobSpec
from jobs.tracking import drop_model_quietly
from worker.metrics_sink import MlflowMetricSink
from worker.mlflow_run import NOTHING_SENT_EARLY, RunFacts, SentEarly, made_model_template, send_early

log = logging.getLogger(__name__)

OPEN_WAIT_S = 600.0  # a run MLflow does not open in this long: the end sends everything
WAIT_SLICE_S = 0.1  # how often the thread looks whether the end has come while it waits for the run


class EarlyResults:
    """One attempt's early results, on their way from the moment it is made (after the
    trainer's setup: the model's options tell which shared files it has)."""

    def __init__(
        self, client: MlflowClient, spec: JobSpec, sink: MlflowMetricSink, opened: list[RunFacts], model: torch.nn.Module
    ) -> None:
        self._client, self._spec, self._sink, self._opened = client, spec, sink, opened
        self._template = made_model_template(model)  # read here, not in the thread: the model is about to train
        self._lock = threading.Lock()  # between the thread starting to send and the end giving up on it
        self._started = False
        self._taken = False  # by the end, for its results: their fate is the end's then
        self._ended = threading.Event()  # the end has come: not started by then, never started
        self._sent: Future[SentEarly] = Future()
        threading.Thread(target=self._run, name="job-early-results", daemon=True).start()

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
            self._sent.set_result(send_early(self._client, self._opened[0], self._spec, self._template))
        except BaseException as exc:  # noqa: BLE001 - handed to the end, which sends everything itself
            self._sent.set_exception(exc)

    def take(self) -> SentEarly:
        """At the job's end: what was sent (waited for, when it is on its way), or nothing
        (not started: it never will be; failed: the end sends it all)."""
        with self._lock:
            self._ended.set()
            self._taken = True
            if not self._started:
                return NOTHING_SENT_EARLY
        try:
            return self._sent.result(timeout=settings.mlflow_wait_at_end_s)
        except Exception as exc:  # noqa: BLE001 - the end sends everything itself
            log.warning("run %s: its early results did not arrive (%s); its end sends them", self._sink.run_id, exc)
            return NOTHING_SENT_EARLY

    def drop(self) -> None:
        """The attempt ends without a model (failed, cancelled, pruned, lost): a record made
        for it is deleted, unless the end took it for its results (then they failed, and
        mlflow_run.log_results left it FAILED, as MLflow's log_model would)."""
        if self._taken:
            return
        sent = self.take()
        if sent.model is not None:
            drop_model_quietly(self._client, sent.model.model_id)
