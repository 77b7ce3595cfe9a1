"""K copies of one model as one computation: the stacked network a pack trains.

Every trial's weights live in one row of a flat [K, P] leaf tensor. The forward splits
it into the layers' weights (one `split`, whose backward is one `cat`: the gradient
arrives as one [K, P] tensor, which the stacked optimizer updates in a handful of ops
whatever the number of layers) and runs the layers as batched kernels:

  Linear     [K, B, in] -> baddbmm with [K, out, in]        (one kernel for all trials)
  Conv2d     [B, K*C, H, W] -> conv2d with groups=K         (HFTA's grouped convolution)
  BatchNorm  [B, K*C, H, W] -> batch_norm over K*C channels (per-trial batch and running statistics)
  Dropout    a mask per trial, drawn from the trial's own generator as torch's dropout draws it
  elementwise activations, max-pooling, flattening, one-hot reading: any layout

  rnn/lstm/gru  the input projection of every time step as one baddbmm, then per time step
             one baddbmm for the recurrent projection and the cell's gate arithmetic, as
             ATen's CPU cells compute it (unidirectional; no dropout between layers)

The models packed are the nn.Sequential ones trainer/models.py builds (mlp, cnn) and its
RecurrentClassifier; `unsupported_layers` names what a model holds beyond these, for
packable()'s reasons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import OneHot, RecurrentClassifier

ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity)
PACKED_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.Flatten, nn.Dropout, OneHot, *ELEMENTWISE)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why this model cannot be stacked: the layers it holds that the stacked forward does not run."""
    if isinstance(model, RecurrentClassifier):
        rnn = model.rnn
        reasons = ["bidirectional recurrent layers"] if rnn.bidirectional else []
        return reasons + (["dropout between recurrent layers"] if rnn.num_layers > 1 and rnn.dropout > 0 else [])
    if not isinstance(model, nn.Sequential):
        return [type(model).__name__]
    return sorted({type(m).__name__ for m in model if not isinstance(m, PACKED_LAYERS)})


class StackedNetwork:
    """The trials' models as one flat parameter tensor plus stacked buffers."""

    def __init__(self, models: list[nn.Module], device: torch.device) -> None:
        template = models[0]
        self.template = template
        self.layers = list(template) if isinstance(template, nn.Sequential) else []
        self.device = device
        self.names = [name for name, _ in template.named_parameters()]
        self.shapes = [p.shape for p in template.parameters()]  # the solo model's
        self.sizes = [p.numel() for p in template.parameters()]
        # Linear weights lie as the solo layer's, [out, in], and baddbmm reads them transposed, as
        # F.linear reads its weight: MKL then runs the solo gemm's kernel and the logits are the
        # solo logits bit for bit (stored [in, out], a 10-class head's came out otherwise).
        self.transposed = [name.startswith("rnn.weight_") for name, _ in template.named_parameters()]
        self.stored_shapes = [s[::-1] if t else s for s, t in zip(self.shapes, self.transposed)]
        self.flat = torch.stack([self.flatten(list(m.parameters())) for m in models]).to(device).requires_grad_(True)
        # BatchNorm running statistics, [K * C] each (the layout batch_norm reads); counters [K].
        self.buffer_names = [name for name, _ in template.named_buffers()]
        self.buffers: dict[str, torch.Tensor] = {}
        self.load_buffers(models)

    @property
    def k(self) -> int:
        return self.flat.shape[0]

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One trial's per-parameter tensors (solo shapes: weights, or optimizer state) -> its flat row."""
        return torch.cat([(t.detach().T if tr else t.detach()).reshape(-1) for t, tr in zip(tensors, self.transposed)])

    def unflatten(self, row: torch.Tensor) -> list[torch.Tensor]:
        """A flat row -> per-parameter tensors in the solo shapes (views where the layout allows)."""
        pieces = row.split(self.sizes)
        return [p.view(s).T if tr else p.view(s) for p, s, tr in zip(pieces, self.stored_shapes, self.transposed)]

    def load_buffers(self, models: list[nn.Module]) -> None:
        for name in self.buffer_names:
            rows = [dict(m.named_buffers())[name].detach() for m in models]
            self.buffers[name] = torch.stack(rows).to(self.device).reshape(-1)

    def write_row(self, k: int, model: nn.Module) -> None:
        """Trial k's weights and buffers into a solo model (for its checkpoint or its result)."""
        with torch.no_grad():
            for p, piece in zip(model.parameters(), self.unflatten(self.flat[k])):
                p.copy_(piece)
            own = dict(model.named_buffers())
            for name, stacked in self.buffers.items():
                own[name].copy_(stacked.view(self.k, -1)[k].view(own[name].shape))

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these trials only: the dropped ones cost nothing from here on."""
        k = self.k
        self.flat = self.flat.detach()[rows].clone().requires_grad_(True)
        self.buffers = {name: b.view(k, -1)[rows].reshape(-1) for name, b in self.buffers.items()}

    def forward(self, x: torch.Tensor, training: bool, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """x: [K, B, ...] (each trial its own batch) -> logits [K, B, classes]."""
        k = self.k
        weights = iter(w.view(k, *s) for w, s in zip(self.flat.split(self.sizes, dim=1), self.stored_shapes))
        if isinstance(self.template, RecurrentClassifier):
            return self._recurrent_forward(x, training, generators, dict(zip(self.names, weights)))
        buffers = iter(self.buffers[n] for n in self.buffer_names)
        grouped = False  # False: [K, B, ...]; True: [B, K*C, H, W], the layout of grouped convolutions
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                x = StackedLinear.apply(x, next(weights), next(weights))
            elif isinstance(layer, nn.Conv2d):
                if not grouped:
                    x = x.transpose(0, 1).reshape(x.shape[1], k * x.shape[2], *x.shape[3:])
                    grouped = True
                weight = next(weights)
                bias = next(weights).reshape(-1) if layer.bias is not None else None
                x = F.conv2d(
                    x, weight.reshape(-1, *weight.shape[2:]), bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups * k,
                )
            elif isinstance(layer, nn.BatchNorm2d):
                weight, bias = next(weights), next(weights)
                mean, var, counter = next(buffers), next(buffers), next(buffers)
                if training:
                    counter.add_(1)  # num_batches_tracked, as the solo layer counts it
                x = F.batch_norm(
                    x, mean, var, weight.reshape(-1), bias.reshape(-1), training, layer.momentum, layer.eps
                )
            elif isinstance(layer, nn.Flatten):
                x = x.reshape(x.shape[0], k, -1).transpose(0, 1) if grouped else x.reshape(k, x.shape[1], -1)
                grouped = False
            elif isinstance(layer, nn.Dropout):
                if training and layer.p > 0:
                    x = x * self._dropout_masks(x, layer.p, generators)
            elif isinstance(layer, nn.ReLU):
                x = torch.relu_(x)  # in place: what it overwrites (a matmul's, a norm's output) no backward needs
            else:  # elementwise, pooling, one-hot: the layer itself, on either layout
                x = layer(x)
        return x

    def _recurrent_forward(
        self, x: torch.Tensor, training: bool, generators: list[torch.Generator] | None, w: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        model, k = self.template, self.k
        rnn = model.rnn
        h_in = model.read(x)  # [K, B, T, features]
        _, b, t = h_in.shape[:3]
        cell = {nn.LSTM: _lstm_step, nn.GRU: _gru_step}.get(type(rnn), _rnn_step)
        for layer in range(rnn.num_layers):
            # ATen's CPU layer: every step's input projection first (x W_ih^T + b_ih), then step by step.
            projected = torch.baddbmm(
                w[f"rnn.bias_ih_l{layer}"].unsqueeze(1), h_in.reshape(k, b * t, -1), w[f"rnn.weight_ih_l{layer}"]
            ).view(k, b, t, -1).unbind(2)  # one unbind: its backward stacks the steps' gradients once
            hidden = h_in.new_zeros(k, b, rnn.hidden_size)
            state = hidden if isinstance(rnn, nn.LSTM) else None
            outputs = []
            for step in range(t):
                recurrent = torch.baddbmm(w[f"rnn.bias_hh_l{layer}"].unsqueeze(1), hidden, w[f"rnn.weight_hh_l{layer}"])
                hidden, state = cell(projected[step], recurrent, hidden, state)
                outputs.append(hidden)
            h_in = torch.stack(outputs, dim=2)
        features = h_in.mean(dim=2) if model.pooling == "mean" else hidden
        if training and model.dropout.p > 0:
            features = features * self._dropout_masks(features, model.dropout.p, generators)
        return StackedLinear.apply(features, w["head.weight"], w["head.bias"])

    @staticmethod
    def _dropout_masks(x: torch.Tensor, p: float, generators: list[torch.Generator] | None) -> torch.Tensor:
        # torch's dropout (CPU) is `input * empty_like(input).bernoulli_(1 - p).div_(1 - p)`: drawn
        # per trial from the trial's generator, each mask is the one the trial draws alone.
        mask = torch.empty_like(x)
        for row, generator in zip(mask, generators or [None] * len(mask)):
            row.bernoulli_(1 - p, generator=generator)
        return mask.div_(1 - p)


class StackedLinear(torch.autograd.Function):
    """K Linear layers: x [K, B, in], weight [K, out, in] (the solo layout), bias [K, out].

    The backward is the solo layer's: autograd's own for baddbmm would make the weight's
    gradient as x^T @ grad, [K, in, out] (then transposed and copied into the [out, in]
    layout), where the solo mm_mat2_backward, seeing its weight read transposed, makes
    grad^T @ x straight into [out, in]. That is the solo summation (bit for bit on one thread;
    x^T @ grad was off by ~2e-7 for a 10-class head) and, for a narrow head, 4x faster."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


# The cells as ATen computes them on the CPU (aten/src/ATen/native/RNN.cpp): `projected` is
# x W_ih^T + b_ih, `recurrent` is h W_hh^T + b_hh, gates in torch's order.


def _lstm_step(projected, recurrent, hidden, cell):  # noqa: ANN001, ANN202
    gates = recurrent + projected
    i, f, g, o = gates.chunk(4, dim=2)
    cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


def _gru_step(projected, recurrent, hidden, _state):  # noqa: ANN001, ANN202
    ir, iz, in_ = projected.chunk(3, dim=2)
    hr, hz, hn = recurrent.chunk(3, dim=2)
    reset = torch.sigmoid(hr + ir)
    update = torch.sigmoid(hz + iz)
    new = torch.tanh(in_ + hn * reset)
    return (hidden - new) * update + new, None


def _rnn_step(projected, recurrent, hidden, _state):  # noqa: ANN001, ANN202
    return torch.tanh(recurrent + projected), None
