"""The CUDA paths: each precision and compile setting trains and resumes, a job's GPU
memory is reported and returned, and running out of it is a failure in words.

Marked `gpu`; skipped with a reason where there is no CUDA device. On a lent GPU
machine bench/device-check.sh runs them (`pytest -m gpu`).
"""

from __future__ import annotations

import math

import pytest
import torch

from jobs.spec import JobSpec
from tests.unit.test_resume import CheckpointingReporter
from trainer.checkpoint import checkpoint_from_bytes
from trainer.recipe import Trainer
from trainer.speed import DeviceOutOfMemory, release_device_memory

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/device-check.sh on one)"),
]
CUDA = torch.device("cuda")


def cnn_job(**overrides) -> JobSpec:  # noqa: ANN003
    base = {
        "dataset": {"name": "digits", "val_fraction": 0.5},
        "model": {"arch": "cnn", "channels": [8, 16], "hidden": [32], "dropout": 0.1},
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": 8,
        "batch_size": 128,  # 898 samples: 7 full batches and a last one of 2, two shapes to compile
        "seed": 5,
        "device": "cuda",
    }
    return JobSpec.model_validate(base | overrides)


def run(job: JobSpec, every: int | None, reporter: CheckpointingReporter, resume: bytes | None = None):  # noqa: ANN201
    trainer = Trainer(job, reporter, checkpoint_every_steps=every)
    trainer.setup()
    if resume is not None:
        trainer.load_state_dict(checkpoint_from_bytes(resume, CUDA))
    return trainer, trainer.train()


SETTINGS = [("fp32", False), ("tf32", False), ("bf16", False), ("fp16", False), ("bf16", True), ("fp16", True)]


@pytest.mark.parametrize(("precision", "compile_model"), SETTINGS, ids=[f"{p}{'+compile' if c else ''}" for p, c in SETTINGS])
def test_each_precision_and_compile_setting_trains_and_resumes(precision: str, compile_model: bool) -> None:
    job = cnn_job(precision=precision, compile=compile_model)
    straight_reporter = CheckpointingReporter()
    straight, result = run(job, every=5, reporter=straight_reporter)
    history = straight_reporter.history
    assert result.final_metrics["val_accuracy"] > 0.85, result.final_metrics  # (0.90 on CPU in fp32 and bf16)
    assert all(math.isfinite(v) for _, v in history["train_loss"])
    first_conv = next(m for m in straight.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)  # NHWC on CUDA, automatically
    [(_, peak_mb)] = history["gpu_peak_memory_mb"]
    assert peak_mb > 0
    assert ("compile_seconds" in history) == compile_model
    if precision == "fp16":
        assert history["fp16_skipped_steps"][-1][1] >= 0 and history["loss_scale"][-1][1] > 0

    at = 10  # mid epoch 2 (8 steps an epoch)
    resumed_reporter = CheckpointingReporter()
    resumed, resumed_result = run(job, every=5, reporter=resumed_reporter, resume=straight_reporter.checkpoints[at])
    assert resumed_result.steps == result.steps
    if precision == "fp16":  # the scaler's state came back with the checkpoint
        assert "scaler" in checkpoint_from_bytes(straight_reporter.checkpoints[at], CUDA)
    # cuDNN's autotuned kernels may differ between two runs: close, not bit-identical.
    assert resumed_result.final_metrics["val_accuracy"] == pytest.approx(result.final_metrics["val_accuracy"], abs=0.05)
    resumed_steps = [s for s, _ in resumed_reporter.history["train_loss"]]
    assert resumed_steps == [s for s, _ in history["train_loss"] if s >= at]


def test_a_jobs_gpu_memory_is_returned_when_it_ends() -> None:
    release_device_memory()
    before = torch.cuda.memory_allocated(CUDA)
    trainer, result = run(cnn_job(batch_size=512), every=None, reporter=CheckpointingReporter())
    assert torch.cuda.memory_allocated(CUDA) > before
    del trainer, result
    release_device_memory()
    assert torch.cuda.memory_allocated(CUDA) == before
    assert torch.cuda.memory_reserved(CUDA) <= before + 2**20 * 32  # the cache given back, bar a block


def test_running_out_of_gpu_memory_is_a_failure_in_words() -> None:
    release_device_memory()
    free, _ = torch.cuda.mem_get_info(CUDA)
    # Everything but 64 MiB taken (what another process on the GPU would hold): the job's
    # first steps cannot find room for their activations.
    hog = torch.empty(free - 64 * 2**20, dtype=torch.uint8, device=CUDA)
    try:
        job = cnn_job(batch_size=898, model={"arch": "cnn", "channels": [256, 512], "hidden": [1024]})
        with pytest.raises(DeviceOutOfMemory) as info:
            run(job, every=None, reporter=CheckpointingReporter())
        # (worker/execute.py describe_failure takes the error_type; tests/unit/test_speed.py checks that)
        error_type, message = info.value.error_type, str(info.value)
        assert error_type == "out_of_memory"
        assert "batch_size 898" in message and "parameters" in message and "smaller batch_size" in message
    finally:
        del hog
        release_device_memory()
