"""Metrics go to an in-process buffer; a background thread ships them to MLflow in batches.

The training step only appends to a deque (no network, no lock); an MLflow
outage delays metrics instead of failing or slowing the job.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.request_header.registry import resolve_request_headers
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from worker.metrics_rule import EVERY_STEP, RULE_TAG, StepMetricsRule

log = logging.getLogger(__name__)

MetricPoint = tuple[str, float, int, int]  # key, value, timestamp (ms), step
# A point of the final model's metrics sent linked to its LoggedModel: (model id, dataset name,
# dataset digest), the fields MLflow's log-batch takes beside a point's own (MlflowMetricSink.link_waiting).
ModelLink = tuple[str, str, str]

# MlflowClient.log_batch accepts at most 1000 metrics, 100 params and 1000 entities in all
# per request (mlflow/utils/validation.py).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
RETRY_BACKOFF_MAX_S = 30.0
# A job whose rule windows its metrics sends a few points a second: one request every few
# seconds, not every second (a log-batch request costs the MLflow server ~6.5 ms besides its
# points: 32 windowed jobs flushing every second would spend a fifth of its core on requests).
WINDOWED_FLUSH_INTERVAL_S = 5.0
# Until the first tick of its cadence, a job's points leave as they come: a request
# whenever this many wait. A job that trains for less than the cadence (a study's short
# trial: ~370 points in ~0.15 s, read back an epoch at a time) sends them while it trains,
# when the MLflow server has time for them, instead of at its end, where the job waits for
# the server to take them (~0.1 ms of its CPU a point) behind a batch still in flight. (A
# first batch at 250 points left after the 4th of 5 epochs and was still in flight when
# the trial ended: its last points queued behind it.) A longer job pays a few requests more
# in its first second, once an attempt.
STREAM_POINTS = 100


def _json_number(value: float) -> str:
    # repr() of a finite float is a JSON number ("0.1", "1e-05"); the REST API's JSON
    # (protobuf mapping) spells non-finite doubles as strings.
    if math.isfinite(value):
        return repr(value)
    return '"NaN"' if math.isnan(value) else ('"Infinity"' if value > 0 else '"-Infinity"')


def log_batch_body(
    run_id: str, batch: list[MetricPoint], key_json: dict[str, str],
    params: Sequence[tuple[str, str]] = (), tags: Sequence[tuple[str, str]] = (),
    links: Mapping[tuple[str, int], ModelLink] | None = None,
) -> str:
    """The log-batch request's JSON, written directly: one format per point instead of a
    dict per point walked by json.dumps (a third less CPU on the sink's thread, which
    shares the training process). `key_json` caches each key's opening of a point.
    `params` and `tags` ride in the same request (log-batch takes all three); `links`, the
    model a point of {(key, step)} is linked to."""
    for key, *_ in batch:
        if key not in key_json:
            key_json[key] = f'{{"key":{json.dumps(key)},"value":'
    finite = math.isfinite
    if links:  # (rare: the last request of a job's run)
        points = ",".join(
            f'{key_json[k]}{repr(v) if finite(v) else _json_number(v)},"timestamp":{ts},"step":{step}'
            + (_link_json(links[(k, step)]) if (k, step) in links else "") + "}"
            for k, v, ts, step in batch
        )
    else:
        points = ",".join(
            f'{key_json[k]}{repr(v) if finite(v) else _json_number(v)},"timestamp":{ts},"step":{step}}}'
            for k, v, ts, step in batch
        )
    body = f'{{"run_id":{json.dumps(run_id)},"metrics":[{points}]'
    for field, pairs in (("params", params), ("tags", tags)):
        if pairs:
            body += f',"{field}":' + json.dumps([{"key": key, "value": value} for key, value in pairs])
    return body + "}"


def _link_json(link: ModelLink) -> str:
    model_id, dataset_name, dataset_digest = link
    return (f',"model_id":{json.dumps(model_id)},"dataset_name":{json.dumps(dataset_name)},'
            f'"dataset_digest":{json.dumps(dataset_digest)}')  # fmt: skip


BatchWriter = Callable[..., None]  # (run_id, points, params=(), tags=(), links=None): one log-batch request


def rest_batch_writer(tracking_uri: str) -> BatchWriter:
    """POST /api/2.0/mlflow/runs/log-batch with plain JSON.

    MlflowClient.log_batch builds a protobuf message per point (~20 us each, measured
    here): at 3 points a step that is ~8% of a small model's step, taken from the
    training thread's core. The same REST call with json costs ~1 us a point; MLflow's
    own credentials and http_request keep auth, TLS and retry settings as the client has them.
    """
    host_creds = get_default_host_creds(tracking_uri)
    key_json: dict[str, str] = {}
    endpoint = "/api/2.0/mlflow/runs/log-batch"
    post = _plain_post(host_creds, endpoint)

    def write(run_id: str, batch: list[MetricPoint], params: Sequence[tuple[str, str]] = (),
              tags: Sequence[tuple[str, str]] = (), links: Mapping[tuple[str, int], ModelLink] | None = None) -> None:
        body = log_batch_body(run_id, batch, key_json, params, tags, links).encode()
        if post is not None:
            response = post(body)
        else:
            response = http_request(
                host_creds, endpoint, "POST", data=body, max_retries=0, timeout=30, raise_on_status=False,
                extra_headers={"Content-Type": "application/json"},
            )  # fmt: skip
        if response.status_code != 200:
            raise RuntimeError(f"MLflow answered {response.status_code}: {response.text[:300]}")

    return write


def _plain_post(host_creds, endpoint: str) -> Callable[[bytes], requests.Response | PostAnswer] | None:  # noqa: ANN001
    """A POST with what http_request would send, worked out once: its headers (MLflow's
    request-header plugins: each call asks every plugin, and the Databricks ones try
    failed imports each time, ~1 ms a request on the training process's core), basic or
    token auth, TLS verification and client certificate. None where http_request does
    more than that (AWS SigV4, auth plugins, the Databricks SDK): those keep it."""
    if host_creds.aws_sigv4 or host_creds.auth or host_creds.use_databricks_sdk or host_creds.client_secret:
        return None
    headers = dict(resolve_request_headers()) | {"Content-Type": "application/json"}
    if host_creds.username and host_creds.password:
        headers["Authorization"] = requests.auth._basic_auth_str(host_creds.username, host_creds.password)
    elif host_creds.token:
        headers["Authorization"] = f"Bearer {host_creds.token}"
    url = host_creds.host.rstrip("/") + endpoint
    extra = {"cert": host_creds.client_cert_path} if host_creds.client_cert_path is not None else {}
    if url.startswith("http://") and not extra and not requests.utils.get_environ_proxies(url):
        return KeptAlivePost(url, headers).post
    session = requests.Session()

    def post(body: bytes) -> requests.Response:
        return session.post(url, data=body, headers=headers, verify=host_creds.verify, timeout=30, **extra)

    return post


@dataclass
class PostAnswer:
    status_code: int
    text: str


class KeptAlivePost:
    """POSTs over one kept-alive HTTP/1.1 connection, with http.client: a requests
    session spends ~1.3 ms of CPU a request (adapters, hooks, cookies, urllib3's pool),
    on the training process's core, once a second or more; this ~0.2 ms. Plain http
    without a proxy only (https, client certificates and proxies keep requests). A
    connection the server closed while idle (its keep-alive timeout) is opened again and
    the request sent once more (MLflow's log-batch skips points it already has)."""

    RECONNECT_ON = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "localhost", parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.headers = headers
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> PostAnswer:
        reused = self.connection is not None
        try:
            return self._send(body)
        except self.RECONNECT_ON:
            self.close()
            if not reused:
                raise
            return self._send(body)  # the kept connection had gone: once more, on a new one
        except Exception:
            self.close()  # a half-read answer leaves the connection unusable
            raise

    def _send(self, body: bytes) -> PostAnswer:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        self.connection.request("POST", self.path, body=body, headers=self.headers)
        response = self.connection.getresponse()
        text = response.read().decode("utf-8", errors="replace")
        if response.will_close:
            self.close()
        return PostAnswer(response.status, text)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def client_batch_writer(client: MlflowClient) -> BatchWriter:
    """For non-HTTP tracking URIs (a local sqlite:// store)."""

    def write(run_id: str, batch: list[MetricPoint], params: Sequence[tuple[str, str]] = (),
              tags: Sequence[tuple[str, str]] = (), links: Mapping[tuple[str, int], ModelLink] | None = None) -> None:
        links = links or {}
        metrics = [Metric(k, v, ts, step, *links.get((k, step), (None, None, None))) for k, v, ts, step in batch]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params],
                         tags=[RunTag(k, v) for k, v in tags])  # fmt: skip

    return write


RunConnector = Callable[[], tuple[str, Mapping[str, int]]]


class MlflowMetricSink:
    """Buffers metric points and ships them to the job's MLflow run from a thread.

    `connect()` opens (or reopens) the run and says which steps MLflow already has
    ({metric: step}, from an earlier attempt): points up to those are skipped, not
    sent twice. While MLflow is unreachable, connecting and sending are retried with
    backoff and points wait in the buffer, so a job starts and trains even when
    MLflow is down, and its run appears when MLflow is back. `added` and `sent`
    count points, so the worker can tell when everything logged before a checkpoint
    is in MLflow.

    Per-step rows (`add_rows`) pass through the job's StepMetricsRule: every step while the
    job sends under `max_points_per_s`, window aggregates above it (worker/metrics_rule.py);
    the run's tag `descent.metrics_rule` says which, set by this thread when it changes.

    The run's `params` and that tag ride in the log-batch requests that carry the points (the
    first ones after the run is opened or reopened; one when there are no points), instead of
    requests of their own: each request costs the MLflow server ~7 ms of CPU besides what it
    carries, and a short job's run takes only a handful.
    """

    def __init__(
        self,
        client: MlflowClient,
        connect: RunConnector,
        flush_interval_s: float,
        buffer_limit: int,
        may_send: Callable[[], bool] | None = None,
        max_points_per_s: float = 0.0,
        burst_points: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        params: Mapping[str, str] | None = None,
        stream_points: int = 0,
    ) -> None:
        self.client = client
        self._params = dict(params or {})
        self._params_to_send: list[tuple[str, str]] = []  # all of them again whenever the run is (re)opened
        self.rule = StepMetricsRule(max_points_per_s, burst_points, clock=clock)
        self._clock = clock
        self._flushed_at = clock()
        # The rule's description the run's tag has: a job's run is created tagged "every step"
        # (worker/mlflow_run.open_run, one request fewer a job), and this sink tags it again
        # only when its rule changes (a reopened run keeps the earlier attempt's word until then).
        self._rule_tagged: str | None = EVERY_STEP
        # False while this attempt cannot be sure it still owns the job (its lease was
        # not renewed lately: the process was frozen, or PostgreSQL is unreachable).
        # Points wait then: sent after a lost lease, they would duplicate the steps
        # that the attempt now owning the job reports.
        self._may_send = may_send
        self._connect = connect
        self.run_id: str | None = None
        self.skip_through: dict[str, int] = {}
        uri = client.tracking_uri
        self._write = rest_batch_writer(uri) if uri.startswith(("http://", "https://")) else client_batch_writer(client)
        self.flush_interval_s = flush_interval_s
        self._pending: deque[MetricPoint] = deque()  # changed under `_counting` (link_waiting looks into it)
        self._links: dict[tuple[str, int], ModelLink] = {}  # link_waiting's points, sent linked to their model
        self._last: dict[str, MetricPoint] = {}  # each `add`ed metric's latest point (last_points_at)
        self._buffer_limit = buffer_limit
        self.added = 0
        self.sent = 0  # sent, or skipped as already in MLflow
        self.dropped = 0
        # `added` is counted from the training thread and from the system-metrics sampler's
        # (add_points): a lost increment would let a checkpoint be stored before its metrics.
        self._counting = threading.Lock()
        self._stop = threading.Event()
        # Wakes the thread before its next tick: stopping, or a batch is full before the first tick.
        self._wake = threading.Event()
        # Until the first tick, a request leaves whenever this many points wait (0: never; a
        # job's sink: STREAM_POINTS); from then on, the cadence alone.
        self._stream_points = stream_points
        self._streams_until = clock() + flush_interval_s
        self._revoked = threading.Event()
        # Notified when points leave the buffer for MLflow, and when the sink stops trying
        # (wait_delivered: a request that carries some of the same points must come after them).
        self._delivery = threading.Condition()
        self._stopped_trying = False
        self._connecting = threading.Lock()
        self._open = threading.Event()  # set once the run is opened (wait_open)
        # The run is opened by the thread, at once: training starts meanwhile (opening takes a
        # few requests, and many seconds while MLflow is unreachable).
        self._thread = threading.Thread(target=self._run, name="mlflow-sink", daemon=True)
        self._thread.start()

    def connected(self) -> bool:
        with self._connecting:
            if self.run_id is None:
                try:
                    run_id, skip_through = self._connect()
                except Exception as exc:  # noqa: BLE001 - MLflow down: train anyway, connect later
                    log.warning("MLflow unreachable, the run will be opened when it is back: %s", exc)
                    return False
                self.skip_through = dict(skip_through)
                self._params_to_send = list(self._params.items())
                self.run_id = run_id
                self._open.set()
            return True

    def wait_open(self, timeout_s: float) -> bool:
        """Whether the sink has opened its run, waiting at most `timeout_s` for it."""
        return self._open.wait(timeout_s)

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called from the training loop: append and return."""
        timestamp = int(time.time() * 1000)
        points = [(key, float(value), timestamp, step) for key, value in metrics.items()]
        for point in points:
            self._last[point[0]] = point
        # One extend (under the lock, see _buffer), not an append a point: the sink's thread
        # taking a batch meanwhile takes all of them or none, so an epoch's points travel together.
        self._buffer(points)

    def add_points(self, points: list[MetricPoint]) -> None:
        """Points made elsewhere, stamped already (a system-metrics sample): sent with the next
        request, not in one of their own."""
        self._buffer(points)

    def _buffer(self, points: list[MetricPoint]) -> None:
        # Appended and counted under one lock: a point buffered but not yet counted (another
        # thread's, e.g. a system sample) would let the checkpoint gate open (`sent >= added`)
        # while points of the steps before the checkpoint still wait behind it.
        with self._counting:
            self._pending.extend(points)
            self.added += len(points)
            if self._stream_points and len(self._pending) >= self._stream_points:
                if self._clock() < self._streams_until:
                    self._wake.set()
                else:
                    self._stream_points = 0
            overflow = len(self._pending) - self._buffer_limit
            while overflow > 0:  # bounded memory through a long outage: the oldest points go first
                self._pending.popleft()
                self.dropped += 1
                overflow -= 1

    def last_points_at(self, step: int) -> list[MetricPoint]:
        """The points `add`ed last of each metric, where that was at `step`, exactly as they
        are sent (the end of a job links them to its model, worker/mlflow_run.model_metrics);
        not those of steps an earlier attempt had sent (skipped: MLflow's point is another)."""
        skipped = self.skip_through
        return [point for key, point in self._last.items() if point[3] == step and step > skipped.get(key, -1)]

    def add_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Many steps' per-step metrics at once, stamped with one time (they were read back
        together); what is buffered is what the job's rule makes of them."""
        self._buffer_rows(self.rule.thin(rows))

    def end_window(self) -> None:
        """Close the rule's open window now (a checkpoint: every step before it is in a point
        buffered before the checkpoint; the end of the run)."""
        self._buffer_rows(self.rule.flush())

    def _buffer_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        if not rows:
            return
        timestamp = int(time.time() * 1000)
        points = [(key, float(value), timestamp, step) for step, metrics in rows for key, value in metrics.items()]
        self._buffer(points)

    def link_waiting(self, points: Sequence[MetricPoint], link: ModelLink) -> bool:
        """Send `points` (the final model's metrics: worker/mlflow_run.model_metrics) linked to
        the model, in the request that carries them anyway, instead of a request of the job's
        end sending them again once the sink has (mlflow_run.log_results: one request after the
        sink's last, on the way to every job's end). Only when every one of them still waits
        here; False when some have left already (the end links them itself)."""
        with self._counting:  # (no batch is taken meanwhile)
            if not points or not all(point in self._pending for point in points):
                return False
            for key, _, _, step in points:
                self._links[(key, step)] = link
            return True

    def _take_batch(self, room: int = MAX_METRICS_PER_BATCH) -> tuple[list[MetricPoint], int]:
        """Up to `room` points to send, and how many were taken in all."""
        with self._counting:
            if not self.skip_through:  # (the usual case: nothing to skip, no test per point)
                pending = self._pending
                batch = [pending.popleft() for _ in range(min(len(pending), room))]
                return batch, len(batch)
            batch, taken = [], 0
            while self._pending and len(batch) < room:
                point = self._pending.popleft()
                taken += 1
                if point[3] > self.skip_through.get(point[0], -1):
                    batch.append(point)
            return batch, taken

    def revoke(self) -> None:
        """This attempt lost the job: send nothing more, from now on (another attempt reports it)."""
        self._revoked.set()
        with self._delivery:
            self._delivery.notify_all()

    def flush_once(self) -> bool:
        """Send what is buffered (and the run's params and rule tag, when due); False when
        MLflow refused (the points stay buffered)."""
        while not self._revoked.is_set():  # checked before every request
            if self._may_send is not None and not self._may_send():
                return False
            if not self.connected():
                return False
            params = self._params_to_send[:MAX_PARAMS_PER_BATCH]
            # The run's tag says the rule in force (once, then at each change), in the request
            # that carries the points it describes.
            description = self.rule.description
            tags = [(RULE_TAG, description)] if description != self._rule_tagged else []
            if not self._pending and not params and not tags:
                return True
            batch, taken = self._take_batch(min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(params) - len(tags)))
            try:
                if batch or params or tags:
                    self._write(self.run_id, batch, params, tags, self._links)
            except Exception as exc:  # noqa: BLE001 - any failure means: keep the points, try later
                with self._counting:
                    self._pending.extendleft(reversed(batch))
                self.sent += taken - len(batch)
                log.warning("MLflow unreachable, %d metric points buffered: %s", len(self._pending), exc)
                return False
            with self._delivery:
                self.sent += taken
                self._delivery.notify_all()
            del self._params_to_send[: len(params)]
            if tags:
                self._rule_tagged = description
        with self._counting:
            self._pending.clear()  # revoked: another attempt reports these
        return True

    def wait_delivered(self, through: int, timeout_s: float) -> bool:
        """Wait until the first `through` points added have left the buffer (in MLflow, skipped
        as already there, or dropped), at most `timeout_s`; False when they have not (MLflow
        unreachable, or the sink gave up or was revoked).

        For a request of another thread that carries some of the same points again (the final
        model's metrics, linked to it: worker/mlflow_run.model_metrics): MLflow inserts such a
        point, finds it there already and skips it, which is safe against points it has
        committed; against the same point inserted by a request still in flight, its recovery
        re-inserts what it did not see yet and answers 400 (an IntegrityError "raised as a
        result of Query-invoked autoflush"), which failed jobs that had trained."""
        deadline = time.monotonic() + timeout_s
        with self._delivery:
            while self.sent + self.dropped < through:
                left = deadline - time.monotonic()
                if self._stopped_trying or self._revoked.is_set() or left <= 0:
                    return False
                self._delivery.wait(left)
            return True

    def _give_up_waiters(self) -> None:
        with self._delivery:
            self._stopped_trying = True
            self._delivery.notify_all()

    def discard(self) -> None:
        """Stop without sending: this attempt lost the job, and another one reports it now."""
        self.revoke()
        self._stop_thread()
        self.flush_once()  # clears the buffer, sends nothing
        self._give_up_waiters()

    def _holds_back(self) -> bool:
        """A windowed job's few points wait for a fuller request (close() sends them at once)."""
        return (self.rule.window_steps > 1 and len(self._pending) < MAX_METRICS_PER_BATCH
                and self._clock() - self._flushed_at < WINDOWED_FLUSH_INTERVAL_S)  # fmt: skip

    def _stop_thread(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        backoff = self.flush_interval_s if self.connected() else self.flush_interval_s * 2
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._holds_back():
                continue
            self._flushed_at = self._clock()
            ok = self.flush_once()
            backoff = self.flush_interval_s if ok else min(backoff * 2, RETRY_BACKOFF_MAX_S)

    def close(self, timeout_s: float = 60.0) -> bool:
        """Stop the thread and send everything left; True when nothing is left unsent."""
        self.end_window()
        self._stop_thread()
        deadline = time.monotonic() + timeout_s
        try:
            while not self.flush_once():
                if time.monotonic() > deadline:
                    log.error("gave up sending %d metric points to MLflow", len(self._pending))
                    return False
                time.sleep(1.0)
            return True
        finally:
            self._give_up_waiters()  # whatever is still waited for will not come from this sink
