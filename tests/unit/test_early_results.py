"""What a job's end sends while the job trains (worker/early_results.py), against a real
(SQLite-backed) MLflow store: the run's spec and the model's record with the files every
such model shares go first; the end sends only the rest and the model is whole; a job that
stops without a model leaves no record behind."""

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


def test_what_was_sent_early_is_not_sent_again_and_the_model_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pytorch
    import torch

    from worker import mlflow_run

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early")
    template = mlflow_run.model_template(result.model)
    puts = record_puts(monkeypatch)

    sent = mlflow_run.send_early(client, run_facts(client, experiment_id, run_id, spec), spec, template)

    assert str(client.get_logged_model(sent.model.model_id).status) == "PENDING"  # until its own files are in
    assert sorted(puts) == sorted(["spec.yaml", *template.files])
    assert "spec.yaml" in {a.path for a in client.list_artifacts(run_id)}
    puts.clear()

    mlflow_run.log_results(client, run_id, spec, result, early=sent)

    assert sorted(puts) == sorted(["confusion_matrix.json", "confusion_matrix.png", "MLmodel", "data/model.pth"])
    [logged] = client.search_logged_models(experiment_ids=[experiment_id])
    assert logged.model_id == sent.model.model_id and str(logged.status) == "READY"
    assert logged.params == mlflow_run.run_params(spec)
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert model(torch.zeros(2, 4)).shape == (2, 3)


def test_a_shared_file_sent_early_that_differs_from_the_models_own_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template read before the training may not be the one the end saves the model with
    (a compiled model's wrapper): a file is skipped only when the very same bytes went early."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from worker import mlflow_run

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-other")
    template = mlflow_run.model_template(result.model)
    other = template._replace(files=template.files | {"requirements.txt": b"torch==0.0.1\n"})
    sent = mlflow_run.send_early(client, run_facts(client, experiment_id, run_id, spec), spec, other)
    puts = record_puts(monkeypatch)

    mlflow_run.log_results(client, run_id, spec, result, early=sent)

    assert "requirements.txt" in puts and "conda.yaml" not in puts
    repository = get_artifact_repository(sent.model.artifact_location)
    (tmp_path / "model").mkdir()
    requirements = Path(repository.download_artifacts("requirements.txt", str(tmp_path / "model")))
    assert requirements.read_bytes() == template.files["requirements.txt"]


def opened_sink(client, run_id: str):  # noqa: ANN001, ANN201
    return MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=3600, buffer_limit=10_000)


def wait_for(condition, timeout_s: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_early_results_go_once_the_run_is_open_and_a_job_without_a_model_keeps_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.early_results import EarlyResults

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-drop")
    opened = [run_facts(client, experiment_id, run_id, spec)]
    sink = opened_sink(client, run_id)
    try:
        early = EarlyResults(client, spec, sink, opened, result.model)
        wait_for(lambda: client.search_logged_models(experiment_ids=[experiment_id]))  # made while it "trains"
        [draft] = client.search_logged_models(experiment_ids=[experiment_id])
        assert str(draft.status) == "PENDING" and draft.source_run_id == run_id

        early.drop()  # cancelled, pruned or failed: no model

        assert client.search_logged_models(experiment_ids=[experiment_id]) == []
        early.drop()  # (a timed-out job ends through two such paths: once is enough)
    finally:
        sink.discard()


def test_the_end_sends_everything_itself_when_the_run_opened_too_late_or_was_not_this_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from worker.early_results import EarlyResults
    from worker.mlflow_run import NOTHING_SENT_EARLY

    client, spec, experiment_id, run_id, result = trained_iris_run(tmp_path, monkeypatch, "early-late")
    mlflow_up = threading.Event()

    def connect() -> tuple[str, dict[str, int]]:
        if not mlflow_up.is_set():
            raise ConnectionError("MLflow is down")
        return run_id, {}

    sink = MlflowMetricSink(client, connect, flush_interval_s=0.05, buffer_limit=10_000)
    try:
        late = EarlyResults(client, spec, sink, [run_facts(client, experiment_id, run_id, spec)], result.model)
        assert late.take() == NOTHING_SENT_EARLY  # the end came first: it sends everything
        mlflow_up.set()
        assert sink.wait_open(30)
        reopened = EarlyResults(client, spec, sink, [], result.model)  # a resumed attempt: not its run
        assert reopened.take() == NOTHING_SENT_EARLY
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
