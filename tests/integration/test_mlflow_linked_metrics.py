"""A job's end against the stack's MLflow server (PostgreSQL store): the final model's metrics
are points its run has, sent again with the model's id (worker/mlflow_run.model_metrics),
while the job's metric sink may still be sending those points.

When the sink's requests split those points (one request's batch ended between them: its
1000-point limit, or a flush that took an epoch's points while they were being added) and the
second was in flight beside the model's request, MLflow's recovery from the duplicate insert
re-inserted a point the other request had not committed yet and answered 400 ("raised as a
result of Query-invoked autoflush", UniqueViolation on metric_pk): the job failed although it
had trained. Racing them by hand on a PostgreSQL store gave that 400 in 10 rounds of 30."""

from __future__ import annotations

import threading
import uuid
from functools import partial

from jobs.spec import JobSpec
from tests.integration.conftest import Stack
from worker.execute import _delivered_points_at
from worker.metrics_sink import MAX_METRICS_PER_BATCH, MlflowMetricSink
from worker.mlflow_run import _log_linked_metrics

ROUNDS = 10
FINAL_STEP = 345


def test_the_models_metrics_never_race_the_sinks_request_that_carries_them(stack: Stack) -> None:
    client = stack.mlflow
    spec = JobSpec.model_validate({"dataset": {"name": "digits"}, "epochs": 1})
    experiment_id = client.create_experiment(f"it-linked-{uuid.uuid4().hex[:8]}")
    for _ in range(ROUNDS):
        run_id = client.create_run(experiment_id).info.run_id
        model_id = client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id
        requests_allowed = threading.Semaphore(1)  # the first of the sink's requests goes now, the next held
        sink = MlflowMetricSink(client, lambda run_id=run_id: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000,
                                may_send=lambda: requests_allowed.acquire(blocking=False))  # fmt: skip
        # The batch limit falls between the final epoch's val_loss and val_accuracy.
        sink.add_points([("train_loss", 1.0 / (i + 1), 1_000 + i, i) for i in range(MAX_METRICS_PER_BATCH - 1)])
        sink.add(FINAL_STEP, {"val_loss": 0.25, "val_accuracy": 0.75})
        sink.add_points([(f"system/sample_{k}", float(k), 2_000, FINAL_STEP) for k in range(300)])
        assert sink.flush_once() is False  # the first request sent (val_loss in it), the second held
        failures: list[BaseException] = []

        # As a job's end reads them: once the sink has sent its points (worker/execute.py).
        def send_linked(evaluation=partial(_delivered_points_at, sink, sink.added, FINAL_STEP)) -> None:  # noqa: ANN001
            try:
                _log_linked_metrics(client, run_id, spec, model_id, evaluation, [])
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        model_request = threading.Thread(target=send_linked)
        model_request.start()
        requests_allowed.release()
        for _ in range(3):
            requests_allowed.release()
        assert sink.close(timeout_s=60)
        model_request.join(60)
        assert failures == []
        for key, value in (("val_loss", 0.25), ("val_accuracy", 0.75)):
            assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(FINAL_STEP, value)]
        assert {m.key: m.value for m in client.get_logged_model(model_id).metrics} == {"val_loss": 0.25,
                                                                                       "val_accuracy": 0.75}
