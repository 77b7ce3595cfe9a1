"""Augmentation of the training batches of an image set: on the device, per sample, vectorised.

Every draw comes from the job's own generator, on the training device, seeded from the job's
seed through a stream of its own: the data order (the recipe's order generator) never depends
on whether or how a job augments, and the generator's state goes into the checkpoint, so a
resumed job continues the same draws. Each batch draws the same things in the same order:
crop offsets, then flips, then cutout centres (those asked for).

Crop and flip move uint8 pixels, before normalisation; cutout zeroes a square after it (the
training mean, as DeVries & Taylor do). Validation and evaluation never pass here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.spec import Augment

AUGMENT_STREAM = 0xA0  # tells the augmentation's seed apart from every other use of the job's seed


def augment_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, AUGMENT_STREAM]).generate_state(1, np.uint64)[0])


class BatchAugmentation:
    def __init__(self, spec: Augment, device: torch.device, seed: int) -> None:
        self.spec = spec
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(augment_seed(seed))

    def _draw(self, high: int, n: int) -> torch.Tensor:
        """n integers in [0, high), on the device."""
        return torch.randint(0, high, (n,), generator=self.generator, device=self.device)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop after zero padding, then a flip with probability 1/2, of uint8 N x C x H x W.

        Both are one gather of each (padded) image at per-sample flat pixel indices: the crop
        shifts a sample's rows and columns, the flip reverses its columns. No loop over samples.
        """
        crop, flip = self.spec.random_crop, self.spec.horizontal_flip
        if crop is None and not flip:
            return x
        n, c, h, w = x.shape
        rows = torch.arange(h, device=x.device).expand(n, h)
        cols = torch.arange(w, device=x.device).expand(n, w)
        if crop is not None:
            pad = crop.padding
            x = F.pad(x, (pad, pad, pad, pad))  # zeros: black borders come in
            rows = rows + self._draw(2 * pad + 1, n)[:, None]
            cols = cols + self._draw(2 * pad + 1, n)[:, None]
        if flip:
            flipped = self._draw(2, n).bool()
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        padded_width = x.shape[3]
        pixels = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(n, 1, h * w)
        return x.reshape(n, c, -1).gather(2, pixels.expand(n, c, h * w)).reshape(n, c, h, w)

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Cutout of normalised float N x C x H x W: a size x size square at a random centre
        (clipped at the border) set to 0 in every channel."""
        cutout = self.spec.cutout
        if cutout is None:
            return x
        n, _, h, w = x.shape
        top = self._draw(h, n)[:, None] - cutout.size // 2
        left = self._draw(w, n)[:, None] - cutout.size // 2
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top) & (rows < top + cutout.size)  # N x H
        in_cols = (cols >= left) & (cols < left + cutout.size)  # N x W
        return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A generator's state is a CPU byte tensor whatever its device (a checkpoint may be mapped elsewhere).
        self.generator.set_state(state["generator"].cpu())
