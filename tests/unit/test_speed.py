"""The speed settings (spec.precision, spec.compile) on CPU: what is refused, what runs, and
that the faster paths still resume. The CUDA paths are in tests/gpu (marked gpu)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastapi.testclient import TestClient
from mlflow.protos.service_pb2 import LogBatch
from mlflow.utils.proto_json_utils import parse_dict

from jobs.spec import JobSpec
from tests.unit.test_resume import CheckpointingReporter, run, weights
from trainer.recipe import StepWindow, TrainingPosition
from trainer.reporting import RecordingReporter
from trainer.speed import DeviceOutOfMemory, UnsupportedSetting
from worker.execute import describe_failure
from worker.metrics_sink import log_batch_body

SMALL = {"dataset": {"name": "iris"}, "model": {"arch": "mlp", "hidden": [8]}, "epochs": 1}


def spec(**overrides) -> JobSpec:  # noqa: ANN003
    base = {
        "dataset": {"name": "wine"},
        "model": {"arch": "mlp", "hidden": [16, 8], "dropout": 0.2},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 3,
        "batch_size": 16,
        "seed": 3,
        "device": "cpu",
    }
    return JobSpec.model_validate(base | overrides)


def test_defaults_are_todays_exact_fp32() -> None:
    job = JobSpec.model_validate(SMALL)
    assert (job.precision, job.compile) == ("fp32", False)


@pytest.mark.parametrize("precision", ["fp16", "tf32"])
def test_a_cuda_only_precision_on_device_cpu_is_a_422_naming_precision(client: TestClient, precision: str) -> None:
    response = client.post("/v1/jobs", json=SMALL | {"precision": precision, "device": "cpu"})
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["detail"]] == ["precision"]
    assert "CUDA" in response.json()["message"]


def test_an_unknown_precision_is_a_422_naming_precision(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=SMALL | {"precision": "fp8"})
    assert response.status_code == 422, response.text
    assert [d["field"] for d in response.json()["detail"]] == ["precision"]


def test_fp16_landing_on_a_cpu_worker_fails_in_words_before_any_data() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device auto takes it")
    job = JobSpec.model_validate(SMALL | {"precision": "fp16"})  # device auto: the API cannot know
    with pytest.raises(UnsupportedSetting, match="precision fp16 runs on CUDA only") as info:
        from trainer.recipe import Trainer

        Trainer(job)
    assert describe_failure(info.value)[0] == "unsupported_setting"


def test_bf16_on_cpu_trains_in_bf16_and_resumes_exactly() -> None:
    job = spec(precision="bf16")
    straight_reporter = CheckpointingReporter()
    straight, result = run(job, every=4, reporter=straight_reporter)
    assert result.final_metrics["val_accuracy"] > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the step computes in
        assert straight.model(straight.data.inputs(straight.data.x_val[:2])).dtype == torch.bfloat16
    expected = weights(straight)
    resumed, resumed_result = run(job, every=4, resume=straight_reporter.checkpoints[12])  # mid epoch 2
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    assert resumed_result.final_metrics == result.final_metrics


def test_bf16_differs_from_fp32_and_fp32_is_unchanged_by_the_field() -> None:
    fp32, _ = run(spec(), every=None)
    explicit, _ = run(spec(precision="fp32", compile=False), every=None)
    bf16, _ = run(spec(precision="bf16"), every=None)
    assert all(torch.equal(a, b) for a, b in zip(weights(fp32).values(), weights(explicit).values()))
    assert not all(torch.equal(a, b) for a, b in zip(weights(fp32).values(), weights(bf16).values()))


def test_compile_reports_its_time_apart_and_resumes() -> None:
    # 1,437 digits training samples in 3 batches of 479: one batch shape, one compilation.
    job = spec(dataset={"name": "digits"}, model={"arch": "mlp", "hidden": [16]}, batch_size=479, epochs=2,
               compile=True)  # fmt: skip
    straight_reporter = CheckpointingReporter()
    straight, result = run(job, every=2, reporter=straight_reporter)
    [(step, seconds)] = straight_reporter.history["compile_seconds"]
    assert step == 0 and seconds > 0
    eager, eager_result = run(spec(dataset={"name": "digits"}, model={"arch": "mlp", "hidden": [16]}, batch_size=479,
                                   epochs=2), every=None)  # fmt: skip
    assert result.final_metrics["val_loss"] == pytest.approx(eager_result.final_metrics["val_loss"], rel=1e-4)
    resumed, _ = run(job, every=2, resume=straight_reporter.checkpoints[2])
    for name, tensor in weights(resumed).items():
        torch.testing.assert_close(tensor, weights(straight)[name], rtol=1e-5, atol=1e-6)


def test_skipped_fp16_steps_are_counted_from_the_loss_scale() -> None:
    # GradScaler on CPU tensors follows the same rule as on CUDA: a step whose gradients
    # overflowed is skipped and the scale halves. The window counts those steps.
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1000)
    position = TrainingPosition()
    window = StepWindow(RecordingReporter())
    window.count_skipped_steps(scaler, position)
    for step, factor in enumerate([1.0, math.inf, 1.0, math.inf, math.inf, 1.0]):
        loss = (weight * factor).sum()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        window.add(step, 0.1, loss.detach().clamp(max=1.0), None, scaler)
        if step == 2:
            window.drain()  # counted across windows
    window.drain()
    assert position.skipped_steps == 3
    assert scaler.get_scale() == 1.0


def test_out_of_memory_becomes_a_failure_that_names_batch_and_model_size() -> None:
    from trainer.recipe import Trainer

    trainer = Trainer(spec())
    trainer.setup()

    def allocate(_x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 1.00 GiB free.")

    trainer.step_model = allocate  # what a real allocation failure in the forward pass raises
    with pytest.raises(DeviceOutOfMemory) as info:
        trainer.train()
    error_type, message = describe_failure(info.value)
    parameters = sum(p.numel() for p in trainer.model.parameters())
    assert error_type == "out_of_memory"
    assert "batch_size 16" in message and f"{parameters:,} parameters" in message
    assert "Tried to allocate 20.00 GiB" in message and "smaller batch_size" in message
    assert "Traceback" not in message


def test_log_batch_body_is_what_mlflow_parses() -> None:
    points = [("train_loss", 0.1 + i, 1764480000000, i) for i in range(3)]
    points += [("lr", 1e-05, 1, 3), ("grad_norm", math.nan, 1, 4), ("grad_norm", math.inf, 1, 5), ("a\"b", -2.0, 1, 6)]
    body = log_batch_body("run-1", points, {})
    message = LogBatch()
    parse_dict(json.loads(body), message)  # MLflow's own reading of a request's JSON
    assert message.run_id == "run-1"
    parsed = [(m.key, m.value, m.timestamp, m.step) for m in message.metrics]
    assert parsed[:4] + parsed[5:] == points[:4] + points[5:]
    assert parsed[4][0] == "grad_norm" and math.isnan(parsed[4][1])
