"""JobSpec: the one description of a training job.

The API validates it, the database stores it (JSON), the worker hands it to the
trainer and MLflow records it as params. Defaults live here and nowhere else.
This module must stay torch-free: the API imports it.

Each concept (dataset, model, optimizer, schedule) is a discriminated union of
small models, one per registered name; the union *is* the spec-side registry
(`DATASETS`, `MODELS`, ... below), and the trainer keeps the matching factories.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class SpecModel(BaseModel):
    # Unknown keys are an error, never silently dropped; inf/NaN are never a valid setting;
    # strict: `"seed": false` or `"epochs": "20"` is a 422, not silently 0 or 20.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


def spec_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names the field it is about (the API reads ctx.field)."""
    return PydanticCustomError("spec_inconsistent", "{message}", {"field": field, "message": message})


# --------------------------------------------------------------------------- datasets

ValFraction = Annotated[
    float, Field(gt=0, lt=1, description="Fraction of the samples held out for validation (stratified).")
]


class BundledDataset(SpecModel):
    """A dataset that ships with scikit-learn: fixed size, no download."""

    SIZE: ClassVar[int]
    FEATURES: ClassVar[int]
    CLASSES: ClassVar[int]
    val_fraction: ValFraction = 0.2

    @property
    def n_samples(self) -> int:
        return self.SIZE

    @property
    def n_classes(self) -> int:
        return self.CLASSES

    @property
    def n_features(self) -> int:
        return self.FEATURES


class DigitsDataset(BundledDataset):
    """8x8 images of handwritten digits, 64 features, 10 classes, 1797 samples (scikit-learn)."""

    SIZE, FEATURES, CLASSES = 1797, 64, 10
    name: Literal["digits"]


class IrisDataset(BundledDataset):
    """Iris flowers: 4 features, 3 classes, 150 samples (scikit-learn)."""

    SIZE, FEATURES, CLASSES = 150, 4, 3
    name: Literal["iris"]


class WineDataset(BundledDataset):
    """Wine cultivars from chemical analysis: 13 features, 3 classes, 178 samples (scikit-learn)."""

    SIZE, FEATURES, CLASSES = 178, 13, 3
    name: Literal["wine"]


class BreastCancerDataset(BundledDataset):
    """Breast cancer Wisconsin (diagnostic): 30 features, 2 classes, 569 samples (scikit-learn)."""

    SIZE, FEATURES, CLASSES = 569, 30, 2
    name: Literal["breast_cancer"]


class SyntheticDataset(SpecModel):
    """A generated dataset; the job's seed makes it reproducible."""

    n_samples: int = Field(1000, ge=20, le=1_000_000, description="Number of samples generated.")
    noise: float = Field(0.1, ge=0, le=10, description="Standard deviation of the Gaussian noise.")
    val_fraction: ValFraction = 0.2

    @property
    def n_features(self) -> int:
        return 2  # moons and spirals are planar; blobs says how many


class MoonsDataset(SyntheticDataset):
    """Two interleaving half circles in 2-D, 2 classes (scikit-learn make_moons)."""

    name: Literal["moons"]

    @property
    def n_classes(self) -> int:
        return 2


class BlobsDataset(SyntheticDataset):
    """Isotropic Gaussian blobs, one per class (scikit-learn make_blobs); noise is the cluster std."""

    name: Literal["blobs"]
    noise: float = Field(1.0, ge=0, le=10, description="Standard deviation of each blob.")
    classes: int = Field(3, ge=2, le=100, description="Number of blobs (classes).")
    features: int = Field(2, ge=1, le=1000, description="Number of dimensions.")

    @property
    def n_classes(self) -> int:
        return self.classes

    @property
    def n_features(self) -> int:
        return self.features


class SpiralsDataset(SyntheticDataset):
    """Interleaved 2-D spirals, one arm per class: not linearly separable."""

    name: Literal["spirals"]
    arms: int = Field(2, ge=2, le=10, description="Number of spiral arms (classes).")
    noise: float = Field(0.2, ge=0, le=10, description="Standard deviation of the Gaussian noise.")

    @property
    def n_classes(self) -> int:
        return self.arms


DatasetSpec = Annotated[
    Union[
        DigitsDataset,
        IrisDataset,
        WineDataset,
        BreastCancerDataset,
        MoonsDataset,
        BlobsDataset,
        SpiralsDataset,
    ],
    Field(discriminator="name"),
]

# --------------------------------------------------------------------------- models


class MLPModel(SpecModel):
    """Multi-layer perceptron: Linear layers with an activation and dropout between them."""

    arch: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        [128, 64], min_length=0, max_length=16, description="Width of each hidden layer."
    )
    activation: Literal["relu", "tanh", "gelu", "sigmoid", "leaky_relu", "elu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability after each hidden layer.")

    def n_parameters(self, n_features: int, n_classes: int) -> int:
        """Weights and biases of the Linear layers, as trainer/models.py builds them."""
        widths = [n_features, *self.hidden, n_classes]
        return sum(w_in * w_out + w_out for w_in, w_out in zip(widths, widths[1:]))


ModelSpec = Annotated[Union[MLPModel], Field(discriminator="arch")]

# --------------------------------------------------------------------------- optimizers

LearningRate = Annotated[float, Field(gt=0, le=1e6, description="Base learning rate.")]
WeightDecay = Annotated[float, Field(ge=0, le=10, description="L2 penalty (decoupled for adamw).")]
Eps = Annotated[float, Field(gt=0, le=1, description="Term added to the denominator for stability.")]
Beta = Annotated[float, Field(ge=0, lt=1, strict=True)]


class SGDOptimizer(SpecModel):
    """Stochastic gradient descent; momentum 0 is plain SGD, > 0 heavy-ball (or Nesterov) momentum."""

    name: Literal["sgd"]
    lr: LearningRate = 0.01
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum factor (0 = plain SGD).")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: WeightDecay = 0.0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDOptimizer:
        if self.nesterov and self.momentum == 0:
            raise spec_error("optimizer.nesterov", "nesterov momentum needs momentum > 0")
        return self


class AdagradOptimizer(SpecModel):
    """AdaGrad: each parameter's step shrinks with the sum of its squared gradients."""

    name: Literal["adagrad"]
    lr: LearningRate = 0.01
    lr_decay: float = Field(0.0, ge=0, le=1, description="Learning-rate decay per step.")
    eps: Eps = 1e-10
    initial_accumulator_value: float = Field(0.0, ge=0, le=1e6, description="Starting value of the sum.")
    weight_decay: WeightDecay = 0.0


class RMSpropOptimizer(SpecModel):
    """RMSProp: divides the step by a running average of squared gradients."""

    name: Literal["rmsprop"]
    lr: LearningRate = 0.01
    alpha: float = Field(0.99, ge=0, lt=1, description="Smoothing constant of the squared-gradient average.")
    eps: Eps = 1e-8
    momentum: float = Field(0.0, ge=0, lt=1, description="Momentum factor.")
    centered: bool = Field(False, description="Normalise by the gradient's estimated variance.")
    weight_decay: WeightDecay = 0.0


class AdamOptimizer(SpecModel):
    """Adam: momentum plus per-parameter step sizes from bias-corrected moment estimates."""

    name: Literal["adam"]
    lr: LearningRate = 0.001
    # Lax only as a container: a JSON list is the tuple (the items stay strict floats).
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.999), strict=False, description="Decay rates of the first and second moments."
    )
    eps: Eps = 1e-8
    weight_decay: WeightDecay = 0.0
    amsgrad: bool = Field(False, description="Use the maximum of past second moments (AMSGrad).")


class AdamWOptimizer(AdamOptimizer):
    """AdamW: Adam with decoupled weight decay."""

    name: Literal["adamw"]  # type: ignore[assignment]
    weight_decay: WeightDecay = 0.01


OptimizerSpec = Annotated[
    Union[SGDOptimizer, AdagradOptimizer, RMSpropOptimizer, AdamOptimizer, AdamWOptimizer],
    Field(discriminator="name"),
]

# --------------------------------------------------------------------------- schedules

MinLR = Annotated[float, Field(ge=0, description="Learning rate at the end of the schedule.")]
WarmupSteps = Annotated[int, Field(ge=1, description="Steps over which the rate ramps from ~0 to lr.")]


class ConstantSchedule(SpecModel):
    """The learning rate stays at lr."""

    name: Literal["constant"]


class StepSchedule(SpecModel):
    """Multiply the rate by gamma every step_size steps."""

    name: Literal["step"]
    step_size: int = Field(100, ge=1, description="Steps between two decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="Factor applied at each decay.")


class ExponentialSchedule(SpecModel):
    """Multiply the rate by gamma after every step."""

    name: Literal["exponential"]
    gamma: float = Field(0.999, gt=0, le=1, description="Factor applied after each step.")


class CosineSchedule(SpecModel):
    """Cosine decay from lr to min_lr over the whole run."""

    name: Literal["cosine"]
    min_lr: MinLR = 0.0


class WarmupLinearSchedule(SpecModel):
    """Linear warm-up for warmup_steps, then linear decay to min_lr at the last step."""

    name: Literal["warmup_linear"]
    warmup_steps: WarmupSteps = 100
    min_lr: MinLR = 0.0


class WarmupCosineSchedule(SpecModel):
    """Linear warm-up for warmup_steps, then cosine decay to min_lr at the last step."""

    name: Literal["warmup_cosine"]
    warmup_steps: WarmupSteps = 100
    min_lr: MinLR = 0.0


class InverseSqrtSchedule(SpecModel):
    """The Transformer schedule: linear warm-up, then lr * sqrt(warmup_steps / step)."""

    name: Literal["inverse_sqrt"]
    warmup_steps: WarmupSteps = 100


ScheduleSpec = Annotated[
    Union[
        ConstantSchedule,
        StepSchedule,
        ExponentialSchedule,
        CosineSchedule,
        WarmupLinearSchedule,
        WarmupCosineSchedule,
        InverseSqrtSchedule,
    ],
    Field(discriminator="name"),
]

# --------------------------------------------------------------------------- losses


class LossName(StrEnum):
    cross_entropy = "cross_entropy"
    mse = "mse"


LOSS_DESCRIPTIONS: dict[LossName, str] = {
    LossName.cross_entropy: "Cross-entropy between the softmax of the logits and the label.",
    LossName.mse: "Mean squared error between the softmax output and the one-hot label.",
}

# --------------------------------------------------------------------------- the job


class JobSpec(SpecModel):
    """Everything needed to run one training job, with every default filled in."""

    name: str = Field(
        "job",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$",
        description="A label for people: letters, digits, space, '_', '-', '.'.",
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=200, description="MLflow experiment; the server's default when absent."
    )
    dataset: DatasetSpec = Field(default_factory=lambda: DigitsDataset(name="digits"))
    model: ModelSpec = Field(default_factory=lambda: MLPModel(arch="mlp"))
    optimizer: OptimizerSpec = Field(default_factory=lambda: AdamOptimizer(name="adam"))
    schedule: ScheduleSpec = Field(default_factory=lambda: ConstantSchedule(name="constant"))
    loss: LossName = Field(LossName.cross_entropy, strict=False)  # the name as a string is the enum
    epochs: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Samples per step (larger than the set = full batch).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds weights, data order and synthetic data.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto takes CUDA when present.")
    log_every_steps: int = Field(1, ge=1, le=1_000_000, description="Interval of the per-step metrics.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    checkpoint_every_steps: int = Field(
        200, ge=1, le=10_000_000, description="Checkpoint interval (also at every epoch end), for crash recovery."
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Runs of the job before a lost worker fails it.")
    timeout_s: float | None = Field(None, gt=0, le=30 * 24 * 3600, description="Fail the job after this long.")

    # -- sizes, computed once so the API, the trainer and the schedules agree

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(train, validation) sample counts; validation rounds up, as scikit-learn does."""
        n = self.dataset.n_samples
        n_val = math.ceil(n * self.dataset.val_fraction)
        return n - n_val, n_val

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.split_sizes[0] / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        n_train, n_val = self.split_sizes
        classes = self.dataset.n_classes
        if min(n_train, n_val) < classes:
            raise spec_error(
                "dataset.val_fraction",
                f"val_fraction {self.dataset.val_fraction} leaves {n_train} training and {n_val} "
                f"validation samples; each split needs at least one sample per class ({classes})",
            )
        warmup = getattr(self.schedule, "warmup_steps", None)
        if warmup is not None and warmup >= self.total_steps:
            raise spec_error(
                "schedule.warmup_steps",
                f"warmup_steps ({warmup}) must be shorter than the run: {self.epochs} epochs x "
                f"{self.steps_per_epoch} steps = {self.total_steps} steps",
            )
        min_lr = getattr(self.schedule, "min_lr", None)
        if min_lr is not None and min_lr >= self.optimizer.lr:
            raise spec_error(
                "schedule.min_lr", f"min_lr ({min_lr}) must be below optimizer.lr ({self.optimizer.lr})"
            )
        return self

    def flat_params(self) -> dict[str, str]:
        """The spec as dotted names (`optimizer.lr`) -> strings, as MLflow records params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            elif isinstance(value, (list, tuple)):
                flat[prefix] = json.dumps(value)
            else:  # None is recorded too (as ""), so every run has the same param columns
                flat[prefix] = "" if value is None else str(value)

        walk("", self.model_dump(mode="json"))
        return flat


# --------------------------------------------------------------------------- registries of names


def members_by_tag(union: Any, tag: str) -> dict[str, type[SpecModel]]:
    """{registered name: spec class} for one discriminated union."""
    inner = get_args(union)[0]
    members = get_args(inner) or (inner,)  # Union[X] of a single member collapses to X
    return {get_args(m.model_fields[tag].annotation)[0]: m for m in members}


DATASETS = members_by_tag(DatasetSpec, "name")
MODELS = members_by_tag(ModelSpec, "arch")
OPTIMIZERS = members_by_tag(OptimizerSpec, "name")
SCHEDULES = members_by_tag(ScheduleSpec, "name")

# Which field of JobSpec holds which union, and the name of its tag.
TAGGED_FIELDS: dict[str, tuple[str, dict[str, type[SpecModel]]]] = {
    "dataset": ("name", DATASETS),
    "model": ("arch", MODELS),
    "optimizer": ("name", OPTIMIZERS),
    "schedule": ("name", SCHEDULES),
}
