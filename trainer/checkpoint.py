"""Checkpoints as bytes: what a Trainer's state_dict becomes on its way to storage."""

from __future__ import annotations

import io
from typing import Any

import torch


def checkpoint_to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_from_bytes(data: bytes, device: torch.device) -> dict[str, Any]:
    # weights_only: a checkpoint read back from storage can hold tensors and plain
    # containers, never code.
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
