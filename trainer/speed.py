"""What a job's speed settings (spec.precision, spec.compile) mean on the device it runs on.

Decided once, in the trainer's setup; the loop asks this object for an autocast context,
a gradient scaler and the module to call, and stays one loop whatever the settings.
fp32 without compile changes nothing: runs stay bit-identical to a plain torch loop on CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from jobs.spec import CUDA_ONLY_PRECISIONS, Precision

AUTOCAST_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
# Convolutions run fastest in NHWC on CUDA (tensor cores, cuDNN's fused kernels).
CHANNELS_LAST_ARCHS = ("cnn", "resnet")


class UnsupportedSetting(ValueError):
    """A speed setting this worker's device cannot run (a spec with device auto landed on a CPU)."""

    error_type = "unsupported_setting"


class DeviceOutOfMemory(RuntimeError):
    """The accelerator ran out of memory: said in words (which batch, which model), not a traceback."""

    error_type = "out_of_memory"

    def __init__(
        self, device: torch.device, batch_size: int, parameters: int | None, precision: str, detail: str = ""
    ) -> None:
        self.batch_size, self.parameters = batch_size, parameters
        model = "building the model" if parameters is None else f"training a model of {parameters:,} parameters"
        # torch's own first line says how much was asked for and how much was free.
        asked = detail.splitlines()[0].rstrip(".") if detail else ""
        super().__init__(
            f"{device} ran out of memory {model} at batch_size {batch_size} (precision {precision})"
            + (f": {asked}" if asked else "")
            + ". A smaller batch_size, a smaller model or precision bf16 needs less memory."
        )


def check_runnable(precision: Precision, device: torch.device) -> None:
    if precision in CUDA_ONLY_PRECISIONS and device.type != "cuda":
        raise UnsupportedSetting(
            f"precision {precision} runs on CUDA only and this job runs on {device}; use fp32 (exact) or bf16"
        )
    if precision == Precision.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedSetting(f"precision bf16 needs a GPU with bfloat16 (Ampere or later); {device} has none: use fp16")


class SpeedSettings:
    def __init__(self, precision: Precision, compile_model: bool, arch: str, device: torch.device) -> None:
        check_runnable(precision, device)
        self.precision = precision
        self.compile_model = compile_model
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.channels_last = device.type == "cuda" and arch in CHANNELS_LAST_ARCHS
        # fp16's narrow range needs loss scaling; a step whose gradients overflowed is
        # skipped by the scaler, and counted (StepWindow reports them), never silently lost.
        self.scaler = torch.amp.GradScaler("cuda") if precision == Precision.fp16 else None
        self.compile_seconds: float | None = None
        if device.type == "cuda":
            # Process-wide switches, set for every job: a job never inherits the previous job's.
            tf32 = precision != Precision.fp32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True  # batch shapes are fixed: autotuning pays once per shape

    @property
    def exact(self) -> bool:
        return self.precision == Precision.fp32 and not self.compile_model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model as the loop holds it: NHWC where that pays (the weights; the first
        convolution's output follows them, so the batches need no copy)."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def compiled(self, model: nn.Module, warm_up: Callable[[nn.Module], None]) -> nn.Module:
        """The module the training step calls. Compiled ahead of the first step by `warm_up`
        (which runs every batch shape the run will see), so that compile time is measured
        on its own (compile_seconds) and stays out of the steps' rate. Evaluation calls the
        eager module: eval mode and its chunk sizes would each be another compilation."""
        if not self.compile_model:
            return model
        compiled = torch.compile(model, dynamic=False)
        start = time.perf_counter()
        warm_up(compiled)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - start
        return compiled


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def release_device_memory() -> None:
    """Give the job's cached CUDA memory back (the next job in this process, or another process, gets it)."""
    if torch.cuda.is_initialized():
        import gc

        gc.collect()  # tensors held only by reference cycles (a traceback's frames) go first
        torch.cuda.empty_cache()
