"""torchvision, imported so that it works beside a CPU-only torch build.

PyPI's torchvision wheels are CUDA builds. Beside a CPU build of the same torch (the
one our CI machines install), torchvision's C++ ops (nms, roi_align: detection, which
Descent never calls) cannot load, and torchvision 0.28's import then fails while it
registers fake kernels for the two ops it does not guard (`torchvision::nms`, `qnms`).
Descent uses only torchvision's pure-Python parts (the dataset readers and ResNet), so
when the import fails for that reason the two ops' schemas are declared and it is
imported again. Everything in Descent imports torchvision from here.
"""

from __future__ import annotations

import sys

import torch

try:
    import torchvision
except RuntimeError as exc:
    if "torchvision::nms" not in str(exc):
        raise
    for module in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
        del sys.modules[module]
    # Kept for the life of the process: the schemas live as long as this library object.
    _MISSING_OPS = torch.library.Library("torchvision", "DEF")  # noqa: N816
    _MISSING_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _MISSING_OPS.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    import torchvision

from torchvision import datasets, models  # noqa: E402

__all__ = ["datasets", "models", "torchvision"]
