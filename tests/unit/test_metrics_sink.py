"""The worker's metric sink against a real (SQLite-backed) MLflow store: a worker that
cannot be sure it still owns its job (its lease not renewed lately, e.g. the process
was frozen) holds its points instead of sending steps another attempt now reports."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from worker.metrics_sink import MlflowMetricSink
from worker.monitor import JobMonitor, JobReporter


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


def test_points_wait_while_the_lease_is_not_known_to_be_ours(store: MlflowClient) -> None:
    run_id = store.create_run(store.create_experiment(f"sink-{uuid.uuid4().hex[:6]}")).info.run_id
    lease_ours = True
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000,
                            may_send=lambda: lease_ours)  # fmt: skip
    try:
        for step in range(5):
            sink.add(step, {"train_loss": 1.0 / (step + 1)})
        lease_ours = False  # frozen past half a lease: the reaper may have moved the job
        assert sink.flush_once() is False
        assert store.get_metric_history(run_id, "train_loss") == []
        lease_ours = True  # renewed: still ours
        assert sink.flush_once() is True
        assert [m.step for m in store.get_metric_history(run_id, "train_loss")] == list(range(5))
    finally:
        sink.discard()


def test_the_monitor_says_a_lease_is_fresh_only_within_half_of_it() -> None:
    monitor = JobMonitor(uuid.uuid4(), JobReporter(None), interval_s=0.5, attempt=1, lease_s=4.0)
    assert monitor.lease_is_fresh()
    monitor.last_renewed = time.monotonic() - 2.5  # the process slept through 2.5 s of a 4 s lease
    assert not monitor.lease_is_fresh()
    assert JobMonitor(uuid.uuid4(), JobReporter(None), interval_s=0.5).lease_is_fresh()  # no lease: in-process runs


def test_a_window_of_rows_reaches_the_sink_as_the_same_points_row_by_row(store: MlflowClient) -> None:
    # The trainer hands the worker's reporter each window's per-step rows at once
    # (log_metric_rows); what the sink buffers is what log_metrics row by row gives.
    from jobs.spec import JobSpec
    from trainer.recipe import Trainer
    from trainer.reporting import RecordingReporter

    spec = JobSpec.model_validate({"dataset": {"name": "iris"}, "model": {"arch": "mlp", "hidden": [8]}, "epochs": 3,
                                   "batch_size": 16, "device": "cpu"})  # fmt: skip
    sink = MlflowMetricSink(store, lambda: ("no-run", {}), flush_interval_s=3600, buffer_limit=10_000,
                            may_send=lambda: False)  # fmt: skip
    try:
        reporter = JobReporter(sink)
        trainer = Trainer(spec, reporter)
        trainer.setup()
        trainer.train()
        recorded = RecordingReporter()
        trainer = Trainer(spec, recorded)
        trainer.setup()
        trainer.train()
        buffered = [(key, value, step) for key, value, _, step in sink._pending]
        expected = [(key, value, step) for key, points in recorded.history.items() for step, value in points]
        assert sorted(buffered) == sorted(expected)
        assert sink.added == len(expected)
        assert reporter.latest["train_loss"] == recorded.history["train_loss"][-1][1]
    finally:
        sink.discard()


def test_the_kept_alive_post_reopens_a_connection_the_server_closed() -> None:
    """The sink's plain-http POST keeps one connection; a server that closed it while idle
    (its keep-alive timeout, said or not) costs a reconnect, not a failed batch."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from worker.metrics_sink import KeptAlivePost

    received: list[bytes] = []
    connections: set[int] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            connections.add(self.client_address[1])
            self.send_response(200 if len(received) != 3 else 400)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            # After the 2nd request the server drops the connection without saying so.
            self.close_connection = len(received) == 2

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        post = KeptAlivePost(f"http://127.0.0.1:{server.server_port}/api/2.0/mlflow/runs/log-batch",
                             {"Content-Type": "application/json"}).post  # fmt: skip
        answers = [post(f'{{"n":{i}}}'.encode()) for i in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 400, 200] and answers[0].text == "{}"
        assert received == [f'{{"n":{i}}}'.encode() for i in range(4)]  # each body once, in order
        assert len(connections) == 2  # one kept for the first two, one reopened for the rest
    finally:
        server.shutdown()


def test_the_final_models_metrics_are_linked_to_it_without_a_second_point_on_the_run(store: MlflowClient) -> None:
    # The end of a job sends the run's last val_* points again, as they are, with the model's
    # id (worker/mlflow_run.model_metrics): the model lists them, the run keeps one point each.
    from jobs.spec import JobSpec
    from worker.mlflow_run import builtin_dataset_input, model_metrics

    spec = JobSpec.model_validate({"dataset": {"name": "iris"}, "epochs": 2})
    experiment_id = store.create_experiment(f"linked-{uuid.uuid4().hex[:6]}")
    run_id = store.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)
    try:
        for epoch, step in ((1, 8), (2, 16)):
            sink.add(step, {"epoch": epoch, "train_accuracy": 0.5 * epoch, "val_loss": 1.0 / epoch,
                            "val_accuracy": 0.4 * epoch})  # fmt: skip
        sink.add(16, {"val_f1_macro": 0.75, "diagnostics_seconds/per_class": 0.01})
        assert sink.flush_once() is True
        evaluation = sink.last_points_at(16)
        assert sorted(p[0] for p in evaluation) == ["diagnostics_seconds/per_class", "epoch", "train_accuracy",
                                                    "val_accuracy", "val_f1_macro", "val_loss"]  # fmt: skip
        assert sink.last_points_at(8) == []  # (every metric's last point is at step 16)
    finally:
        sink.discard()
    model_id = store.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id
    linked = model_metrics(spec, model_id, evaluation)
    store.log_batch(run_id, metrics=linked)

    model = store.get_logged_model(model_id)
    dataset = builtin_dataset_input(spec).dataset
    got = {m.key: (m.value, m.step, m.run_id, m.dataset_name, m.dataset_digest) for m in model.metrics}
    assert got == {key: (value, 16, run_id, "iris", dataset.digest)
                   for key, value in (("val_loss", 0.5), ("val_accuracy", 0.8), ("val_f1_macro", 0.75))}  # fmt: skip
    for key in ("val_loss", "val_accuracy"):  # still one point an epoch on the run
        assert [m.step for m in store.get_metric_history(run_id, key)] == [8, 16]


def test_the_runs_params_ride_in_the_first_request_with_its_points(store: MlflowClient) -> None:
    # A request of their own cost the MLflow server as much CPU as a small batch of points:
    # the params go with the sink's first points, chunked as log-batch allows (100 a request,
    # 1,000 entities in all), and alone when the job ends before any point.
    experiment_id = store.create_experiment(f"params-{uuid.uuid4().hex[:6]}")
    params = {f"p.{i:03d}": str(i) for i in range(150)}
    for points in (950, 0):
        run_id = store.create_run(experiment_id).info.run_id
        sink = MlflowMetricSink(store, lambda run_id=run_id: (run_id, {}), flush_interval_s=3600,
                                buffer_limit=10_000, params=params)  # fmt: skip
        requests: list[tuple[int, int, int]] = []
        write = sink._write
        sink._write = lambda run, batch, p=(), t=(), links=None: (requests.append((len(batch), len(p), len(t))), write(run, batch, p, t, links))
        try:
            for step in range(points):
                sink.add(step, {"train_loss": 1.0 / (step + 1)})
            assert sink.flush_once() is True
            assert sink.flush_once() is True  # nothing more: the params went once
        finally:
            sink.discard()
        run = store.get_run(run_id)
        assert run.data.params == params
        assert len(store.get_metric_history(run_id, "train_loss")) == points
        if points:
            assert requests == [(900, 100, 0), (50, 50, 0)]  # 1,000 entities at most a request
        else:
            assert requests == [(0, 100, 0), (0, 50, 0)]


def test_a_jobs_points_leave_as_they_come_until_its_first_tick(store: MlflowClient) -> None:
    # A study's trial trains for less than the sink's cadence: its points must go while it
    # trains (a request whenever `stream_points` wait), not all at its end, where the job
    # waits for MLflow to take them. After the cadence's first tick, the cadence alone.
    run_id = store.create_run(store.create_experiment(f"stream-{uuid.uuid4().hex[:6]}")).info.run_id
    now = [0.0]
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000,
                            params={"optimizer.name": "adam"}, stream_points=50, clock=lambda: now[0])  # fmt: skip
    requests: list[int] = []
    write = sink._write
    sink._write = lambda run, batch, p=(), t=(), links=None: (requests.append(len(batch)), write(run, batch, p, t, links))

    def sent_within(seconds: float, count: int) -> bool:
        deadline = time.monotonic() + seconds
        while sink.sent < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return sink.sent >= count

    try:
        for step in range(49):
            sink.add(step, {"train_loss": 1.0 / (step + 1)})
        assert not sent_within(0.3, 1)  # fewer than 50 wait: nothing before the tick
        sink.add(49, {"train_loss": 0.02})
        assert sent_within(10, 50)
        stamp = int(time.time() * 1000)
        sink.add_points([("train_loss", 1.0 / (s + 1), stamp, s) for s in range(50, 120)])  # an epoch's, at once
        assert sent_within(10, 120)  # they leave too: the tick is an hour away
        now[0] = 3600.0  # past the first tick: the cadence alone from now on
        sink.add_points([("train_loss", 1.0 / (s + 1), stamp, s) for s in range(120, 300)])
        assert not sent_within(0.3, 121)
        assert sink.close(timeout_s=10)
    finally:
        sink.discard()
    assert requests == [50, 70, 180]
    assert store.get_run(run_id).data.params == {"optimizer.name": "adam"}
    assert len(store.get_metric_history(run_id, "train_loss")) == 300


def test_a_sample_buffered_into_the_sink_goes_with_its_points(store: MlflowClient) -> None:
    # A job's system metrics go into its sink (worker/system_metrics.run_destination): the last
    # sample of a short job was one more request, waited for before the job's end.
    from worker.system_metrics import SampleDestination, SystemMetricsSampler

    run_id = store.create_run(store.create_experiment(f"sample-{uuid.uuid4().hex[:6]}")).info.run_id
    run = {"id": None}
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)
    requests: list[int] = []
    write = sink._write
    sink._write = lambda run, batch, p=(), t=(), links=None: (requests.append(len(batch)), write(run, batch, p, t, links))
    destination = SampleDestination(lambda: run["id"], lambda: 12, buffer=sink.add_points)
    sampler = SystemMetricsSampler(store, [destination], interval_s=3600)
    sampler._write = lambda *args: pytest.fail("a sample for a sink must not be sent on its own")
    try:
        sink.add(12, {"train_loss": 0.5})
        assert sampler.sample_and_send() is True  # (taken although the run is not open yet: the sink opens it)
        assert sink.added > 1
        assert sink.flush_once() is True
    finally:
        sink.discard()
    assert requests == [sink.added]  # the loss and the sample: one request
    history = store.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert [p.step for p in history] == [12]


def test_the_models_metrics_are_sent_only_after_the_sink_has_sent_those_points(
    tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    # A job's end sends its results while its sink sends the last points, and the model's
    # metrics are some of those points again. In flight beside the sink's request that carries
    # the same points, MLflow (PostgreSQL) lost the race for their insert and answered 400
    # ("raised as a result of Query-invoked autoflush"), failing a job that had trained: the
    # model's metrics wait until the sink has sent them.
    import threading
    from functools import partial

    from tests.unit.test_job_processes import trained_iris_run
    from worker import mlflow_run
    from worker.execute import _delivered_points_at

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "linked")
    may_send = threading.Event()  # the sink's last request still on its way (here: held)
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=0.05, buffer_limit=10_000,
                            may_send=may_send.is_set)  # fmt: skip
    sink.add(result.steps, {"val_loss": 0.25, "val_accuracy": 0.75})
    evaluation = partial(_delivered_points_at, sink, sink.added, result.steps)  # as a job's end reads them
    results = threading.Thread(target=mlflow_run.log_results, args=(client, run_id, spec, result),
                               kwargs={"evaluation": evaluation})  # fmt: skip
    results.start()
    try:
        deadline = time.monotonic() + 60  # everything else of the results is sent meanwhile
        while not client.get_run(run_id).outputs.model_outputs and time.monotonic() < deadline:
            time.sleep(0.05)
        results.join(1.0)
        assert results.is_alive()  # waiting for the sink
        assert client.get_metric_history(run_id, "val_loss") == []
    finally:
        may_send.set()
        assert sink.close(timeout_s=30)
        results.join(60)
    [model] = client.search_logged_models(experiment_ids=[experiment_id])
    assert {m.key: m.value for m in model.metrics} == {"val_loss": 0.25, "val_accuracy": 0.75}
    assert str(model.status) == "READY"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(result.steps, 0.25)]


def test_a_wait_for_points_ends_when_the_sink_gives_up_on_them(store: MlflowClient) -> None:
    import threading

    def unreachable() -> tuple[str, dict[str, int]]:
        raise ConnectionError("MLflow is down")

    sink = MlflowMetricSink(store, unreachable, flush_interval_s=3600, buffer_limit=10_000)
    sink.add(1, {"val_loss": 0.5})
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(sink.wait_delivered(sink.added, 60)))
    waiter.start()
    started = time.monotonic()
    assert sink.close(timeout_s=0) is False
    waiter.join(10)
    assert waited == [False] and time.monotonic() - started < 10
    assert sink.wait_delivered(0, 0) is True  # nothing to wait for


def test_a_request_mlflow_refuses_keeps_its_points_until_mlflow_takes_them(store: MlflowClient) -> None:
    # A 400 (here: the run is deleted; at a job's end, the duplicate-insert race) loses no
    # point: the sink keeps them and sends them again, as it does while MLflow is down.
    run_id = store.create_run(store.create_experiment(f"refused-{uuid.uuid4().hex[:6]}")).info.run_id
    sink = MlflowMetricSink(store, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)
    try:
        for step in range(5):
            sink.add(step, {"train_loss": 1.0 / (step + 1)})
        store.delete_run(run_id)
        assert sink.flush_once() is False
        assert (sink.added, sink.sent, sink.dropped) == (5, 0, 0)
        store.restore_run(run_id)
        assert sink.flush_once() is True
        assert [m.step for m in store.get_metric_history(run_id, "train_loss")] == list(range(5))
    finally:
        sink.discard()


def test_a_resumed_attempt_links_to_its_model_none_of_the_points_an_earlier_attempt_sent(store: MlflowClient) -> None:
    # Killed after its last points reached MLflow but before its model did, a job resumes at
    # its last step and evaluates it again. Its sink learns which steps the run has only once
    # it has (re)opened the run, from its own thread, which a resume that trains no step can
    # outrun: its end read the model's points before that, and linked them to the model, a
    # second point at the same step (seen in the chaos suite).
    import threading
    from functools import partial

    from mlflow.entities import Metric

    from worker.execute import _delivered_points_at

    run_id = store.create_run(store.create_experiment(f"resumed-{uuid.uuid4().hex[:6]}")).info.run_id
    earlier = int(time.time() * 1000)
    store.log_batch(run_id, metrics=[Metric("val_loss", 0.3, earlier, 16), Metric("val_accuracy", 0.7, earlier, 16)])
    reopened = threading.Event()

    def reopen() -> tuple[str, dict[str, int]]:  # slower than this attempt's training
        reopened.wait(30)
        return run_id, {"val_loss": 16, "val_accuracy": 16}

    sink = MlflowMetricSink(store, reopen, flush_interval_s=0.05, buffer_limit=10_000)
    sink.add(16, {"val_loss": 0.31, "val_accuracy": 0.69})  # this attempt's evaluation of the same step
    evaluation = partial(_delivered_points_at, sink, sink.added, 16)  # as a job's end reads them
    threading.Timer(0.3, reopened.set).start()
    assert evaluation() == []  # the run's points at step 16 are the earlier attempt's: nothing of this one to link
    assert sink.close(timeout_s=30)
    assert [(m.step, m.value) for m in store.get_metric_history(run_id, "val_loss")] == [(16, 0.3)]
