"""Models: arch -> builder(spec, shape, n_classes), `shape` being the view of the data
the model reads (jobs/shapes.py). Each builder's parameter count is the one its spec's
`n_parameters` states (tests/unit/test_models.py checks them against each other)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from jobs.shapes import DataShape, ImageShape, SequenceShape
from jobs.spec import CNNModel, MLPModel, RecurrentModel, ResNetModel, TransformerModel
from trainer.vision import models as vision_models

# Through trainer.vision, never `import torchvision` directly: it makes the import work beside a CPU torch.
BasicBlock, ResNet = vision_models.resnet.BasicBlock, vision_models.resnet.ResNet

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


class OneHot(nn.Module):
    """Token ids (B, T) -> one-hot float vectors (B, T, vocab).

    The rnn family and the mlp read tokens one-hot rather than through a learned
    embedding: no extra width to choose, and the first layer's weights are the
    embedding. The cost is a B x T x vocab input, fine for small vocabularies.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens, self.vocab).float()


def _dense(width: int, hidden: list[int], n_classes: int, activation: str, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for out in hidden:
        layers += [nn.Linear(width, out), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = out
    layers.append(nn.Linear(width, n_classes))
    return layers


def build_mlp(spec: MLPModel, shape: DataShape | int, n_classes: int) -> nn.Module:
    # Plain nn.Sequential of stock layers: a pickled model loads with torch alone.
    # An int is a count of flat features; tabular data needs no flattening layer, so
    # the first Linear stays model[0].
    n_inputs = shape if isinstance(shape, int) else shape.flat_size
    reader: list[nn.Module] = []
    if isinstance(shape, SequenceShape) and shape.tokens:
        reader = [OneHot(shape.vocab), nn.Flatten()]  # type: ignore[arg-type]
    elif isinstance(shape, (ImageShape, SequenceShape)):
        reader = [nn.Flatten()]
    return nn.Sequential(*reader, *_dense(n_inputs, spec.hidden, n_classes, spec.activation, spec.dropout))


def build_cnn(spec: CNNModel, shape: ImageShape, n_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels, height, width = shape.dims
    for out in spec.channels:
        layers += [
            # No conv bias: the batch norm right after it subtracts the mean, bias included.
            nn.Conv2d(channels, out, spec.kernel_size, padding=spec.kernel_size // 2, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, height, width = out, height // 2, width // 2
    layers.append(nn.Flatten())
    if spec.dropout > 0:
        layers.append(nn.Dropout(spec.dropout))  # before the first dense layer; _dense adds the rest
    layers += _dense(channels * height * width, spec.hidden, n_classes, "relu", spec.dropout)
    return nn.Sequential(*layers)


class RecurrentClassifier(nn.Module):
    """rnn / lstm / gru over the sequence, then the last (or mean) hidden state into a Linear."""

    def __init__(self, cell: type[nn.RNNBase], spec: RecurrentModel, shape: SequenceShape, n_classes: int) -> None:
        super().__init__()
        self.read = OneHot(shape.vocab) if shape.tokens else nn.Identity()  # type: ignore[arg-type]
        self.rnn = cell(
            shape.step_size,
            spec.hidden_size,
            num_layers=spec.num_layers,
            batch_first=True,
            # torch applies it between layers only, and warns when there is one layer.
            dropout=spec.dropout if spec.num_layers > 1 else 0.0,
            bidirectional=spec.bidirectional,
        )
        if isinstance(self.rnn, (nn.LSTM, nn.GRU)):
            _chrono_gate_biases(self.rnn, shape.length)
        self.directions = 2 if spec.bidirectional else 1
        self.pooling = spec.pooling
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(spec.hidden_size * self.directions, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, state = self.rnn(self.read(x))
        if self.pooling == "mean":
            features = outputs.mean(dim=1)
        else:
            hidden = state[0] if isinstance(state, tuple) else state  # the LSTM also returns its cell state
            # The top layer's final state of each direction: the backward one has read the
            # whole sequence too, which outputs[:, -1] would not give.
            features = hidden[-self.directions :].transpose(0, 1).reshape(len(x), -1)
        return self.head(self.dropout(features))


def _chrono_gate_biases(rnn: nn.RNNBase, length: int) -> None:
    """Chrono initialisation (Tallec & Ollivier, 2018) of the gates that keep the state.

    With torch's default biases (small, around 0) the LSTM's forget gate and the GRU's
    update gate start near sigmoid(0) = 0.5: the cell halves what it holds at every
    step, so after T steps almost nothing of the first ones is left, in the state or in
    the gradient, and the memory a gated cell exists for has to be found first.
    Measured on sequence_memory, T = 30, 500 steps: with the usual forget bias of 1 the
    LSTM solved 2 seeds of 5, a plain RNN 4, the chrono LSTM 5. The keep gate's bias is
    drawn as log(U(1, T - 1)), so the cells start with memory times spread over 1..T
    steps, the range of dependencies the data can have; the LSTM's input gate gets the
    opposite bias. A plain RNN has no such gate.
    torch's gate order: LSTM (input, forget, cell, output), GRU (reset, update, new).
    """
    h = rnn.hidden_size
    with torch.no_grad():
        for name, bias in rnn.named_parameters():
            if not name.startswith("bias_"):
                continue
            if name.startswith("bias_hh"):  # the two biases add up: the drawn value goes in bias_ih
                bias[h : 2 * h] = 0.0
                if isinstance(rnn, nn.LSTM):
                    bias[:h] = 0.0
                continue
            keep = torch.empty(h).uniform_(1.0, max(length - 1, 1)).log()
            bias[h : 2 * h] = keep
            if isinstance(rnn, nn.LSTM):
                bias[:h] = -keep


def _recurrent(cell: type[nn.RNNBase]) -> Callable[[RecurrentModel, SequenceShape, int], nn.Module]:
    def build(spec: RecurrentModel, shape: SequenceShape, n_classes: int) -> nn.Module:
        return RecurrentClassifier(cell, spec, shape, n_classes)

    return build


class TransformerClassifier(nn.Module):
    """[CLS] + embedded steps + learned positions -> pre-norm encoder blocks -> [CLS] into a Linear."""

    def __init__(self, spec: TransformerModel, shape: SequenceShape, n_classes: int) -> None:
        super().__init__()
        d = spec.d_model
        self.embed: nn.Module = (
            nn.Embedding(shape.vocab, d) if shape.tokens else nn.Linear(shape.features, d)  # type: ignore[arg-type]
        )
        # BERT's initialisation for the learned vectors: small, so no position dominates at first.
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, shape.length + 1, d) * 0.02)
        self.dropout = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                spec.num_heads,
                spec.ff_dim,
                spec.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(spec.num_layers)
        )
        # Pre-norm blocks leave the residual stream unnormalised: one LayerNorm before the head.
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.embed(x)
        h = torch.cat([self.cls.expand(len(x), -1, -1), steps], dim=1) + self.positions
        h = self.dropout(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class ResNetClassifier(ResNet):
    """torchvision's ResNet with basic blocks, for any number of input channels and any width.

    Its blocks (BasicBlock), stages (`_make_layer`), forward and initialisation are
    torchvision's; only the widths and the stem are set here, where torchvision's own
    __init__ has 3 input channels, 64 stem channels and the ImageNet stem written in.
    The stem (ResNetModel.small_stem): images up to 64 px get the small-image one used
    for CIFAR (a 3x3 conv, stride 1, no max-pool), so a 32x32 image reaches the last
    stage at 4x4 rather than 1x1; larger images torchvision's 7x7 conv, stride 2, and
    3x3 max-pool. At width 1 and the ImageNet stem the module is torchvision's
    resnet18 / resnet34 (num_classes, in_channels aside), parameter for parameter.
    """

    def __init__(self, spec: ResNetModel, shape: ImageShape, n_classes: int) -> None:
        nn.Module.__init__(self)  # not ResNet.__init__: it would build the 64-channel RGB stem first
        stem, *_, last = widths = spec.channels
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, 1, 64  # what _make_layer reads
        if spec.small_stem(shape):
            self.conv1 = nn.Conv2d(shape.channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(shape.channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        # layer1 keeps the stem's width and size: no shortcut conv, as in torchvision's.
        blocks = spec.STAGES[spec.depth]
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(last, n_classes)
        for m in self.modules():  # torchvision's initialisation (zero_init_residual=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "rnn": _recurrent(nn.RNN),
    "lstm": _recurrent(nn.LSTM),
    "gru": _recurrent(nn.GRU),
    "transformer": TransformerClassifier,
    "resnet": ResNetClassifier,
}
