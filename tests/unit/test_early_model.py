"""A job's model record made while it trains (worker/early_model.py), against a real
(SQLite-backed) MLflow store: the end fills it and the model is whole, the sink sends the
model's metrics linked to it, and a job that stops without a model leaves no record behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.unit.test_job_processes import trained_iris_run
from worker.metrics_sink import MlflowMetricSink


def run_facts(client, experiment_id: str, run_id: str, spec):  # noqa: ANN001, ANN201
    from worker import mlflow_run

    return mlflow_run.RunFacts(experiment_id, run_id, client.get_run(run_id).info.artifact_uri,
                               mlflow_run.run_params(spec))  # fmt: skip


def record_puts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths every upload of the worker's MLflow code sends, in order."""
    from worker import mlflow_run

    paths: list[str] = []
    put = mlflow_run._put

    def recorded(upload) -> None:  # noqa: ANN001
        paths.append(upload.path)
        put(upload)

    monkeypatch.setattr(mlflow_run, "_put", recorded)
    return paths


def test_a_record_made_while_the_job_trained_is_its_models_and_the_end_makes_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pytorch
    import torch

    from worker import mlflow_run

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early")
    record = mlflow_run.create_model_record(client, run_facts(client, experiment_id, run_id, spec))
    assert str(client.get_logged_model(record.model_id).status) == "PENDING"  # until its files are in
    puts = record_puts(monkeypatch)

    mlflow_run.log_results(client, run_id, spec, result, record=record)

    assert {"spec.yaml", "confusion_matrix.json", "MLmodel", "data/model.pth", "requirements.txt"} <= set(puts)
    [logged] = client.search_logged_models(experiment_ids=[experiment_id])
    assert logged.model_id == record.model_id and str(logged.status) == "READY"
    assert logged.params == mlflow_run.run_params(spec)
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert model(torch.zeros(2, 4)).shape == (2, 3)


def opened_sink(client, run_id: str):  # noqa: ANN001, ANN201
    return MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)


def wait_for(condition, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_record_is_made_once_the_run_is_open_and_a_job_without_a_model_keeps_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.early_model import EarlyModelRecord

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-drop")
    opened = [run_facts(client, experiment_id, run_id, spec)]
    sink = opened_sink(client, run_id)
    try:
        early = EarlyModelRecord(client, sink, opened)
        wait_for(lambda: client.search_logged_models(experiment_ids=[experiment_id]))  # made while it "trains"
        [draft] = client.search_logged_models(experiment_ids=[experiment_id])
        assert str(draft.status) == "PENDING" and draft.source_run_id == run_id

        early.drop()  # cancelled, pruned or failed: no model

        assert client.search_logged_models(experiment_ids=[experiment_id]) == []
        early.drop()  # (a timed-out job ends through two such paths: once is enough)
    finally:
        sink.discard()


def test_the_end_makes_the_record_itself_when_the_run_opened_too_late_or_was_not_this_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from worker.early_model import EarlyModelRecord

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-late")
    mlflow_up = threading.Event()

    def connect() -> tuple[str, dict[str, int]]:
        if not mlflow_up.is_set():
            raise ConnectionError("MLflow is down")
        return run_id, {}

    sink = MlflowMetricSink(client, connect, flush_interval_s=0.05, buffer_limit=10_000)
    try:
        late = EarlyModelRecord(client, sink, [run_facts(client, experiment_id, run_id, spec)])
        assert late.take() is None  # the end came first: it makes the record
        mlflow_up.set()
        assert sink.wait_open(30)
        reopened = EarlyModelRecord(client, sink, [])  # a resumed attempt: not its run
        assert reopened.take() is None
        time.sleep(0.3)  # (neither thread sends anything after the end)
        assert client.search_logged_models(experiment_ids=[experiment_id]) == []
    finally:
        sink.discard()


def test_the_model_records_an_earlier_attempt_left_pending_are_deleted(tmp_path: Path) -> None:
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from jobs.tracking import drop_unfinished_models

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("drafts", artifact_location=str(tmp_path / "artifacts"))
    run_id, other_run = (client.create_run(experiment_id).info.run_id for _ in range(2))
    killed = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)  # its attempt died
    done = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    client.finalize_logged_model(done.model_id, LoggedModelStatus.READY)
    elsewhere = client.create_logged_model(experiment_id, name="model", source_run_id=other_run)  # still training

    assert drop_unfinished_models(client, experiment_id, run_id) == 1

    remaining = {m.model_id for m in client.search_logged_models(experiment_ids=[experiment_id])}
    assert remaining == {done.model_id, elsewhere.model_id}
    assert killed.model_id not in remaining


def test_the_final_models_metrics_go_linked_in_the_sinks_own_request_while_they_wait_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the model's record made while the job trained, its metrics need no request after
    the sink's last: the sink sends them linked. Once they have left, the end links them."""
    from worker.mlflow_run import model_link, model_points

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-linked")
    model_id = client.create_logged_model(experiment_id, name="model", source_run_id=run_id).model_id
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)
    sink.add(4, {"train_loss": 0.5, "val_loss": 0.3, "val_accuracy": 0.7})
    assert sink.flush_once()
    assert not sink.link_waiting(model_points(sink.last_points_at(4)), model_link(spec, model_id))  # left already
    sink.add(5, {"train_loss": 0.4, "val_loss": 0.25, "val_accuracy": 0.75})
    final = model_points(sink.last_points_at(5))
    assert [key for key, *_ in final] == ["val_loss", "val_accuracy"]

    assert sink.link_waiting(final, model_link(spec, model_id))
    assert sink.close(timeout_s=30)

    model = client.get_logged_model(model_id)
    assert {(m.key, m.value, m.step) for m in model.metrics} == {("val_loss", 0.25, 5), ("val_accuracy", 0.75, 5)}
    assert {m.dataset_name for m in model.metrics} == {"iris"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(4, 0.3), (5, 0.25)]


def test_a_linked_point_in_the_rest_request_names_its_model_and_dataset() -> None:
    import json

    from worker.metrics_sink import log_batch_body

    points = [("train_loss", 0.5, 1000, 7), ("val_loss", 0.25, 1000, 7)]
    body = json.loads(log_batch_body("run-1", points, {}, links={("val_loss", 7): ("m-1", "digits", "abc")}))
    assert body["metrics"][0] == {"key": "train_loss", "value": 0.5, "timestamp": 1000, "step": 7}
    assert body["metrics"][1] == {"key": "val_loss", "value": 0.25, "timestamp": 1000, "step": 7, "model_id": "m-1",
                                  "dataset_name": "digits", "dataset_digest": "abc"}  # fmt: skip
