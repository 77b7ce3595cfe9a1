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

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from jobs.pool_names import DEFAULT_POOL, POOL_NAME_MAX_LENGTH, POOL_NAME_PATTERN
from jobs.shapes import DataShape, ImageShape, SequenceShape, ShapeKind, TabularShape, either


class SpecModel(BaseModel):
    # Unknown keys are an error, never silently dropped; inf/NaN are never a valid setting;
    # strict: `"seed": false` or `"epochs": "20"` is a 422, not silently 0 or 20.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


def spec_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names the field it is about (the API reads ctx.field)."""
    return PydanticCustomError("spec_inconsistent", "{message}", {"field": field, "message": message})


def refuse_nul(value: str) -> str:
    """PostgreSQL cannot store U+0000 in text or JSONB: refused here, named, as a 422."""
    if "\x00" in value:
        raise PydanticCustomError("string_nul", "must not contain a NUL character (\\u0000)")
    return value


# Free text that is stored (in PostgreSQL, in MLflow): any string but one holding a NUL.
NulFreeStr = Annotated[str, AfterValidator(refuse_nul)]


def members_by_tag(union: Any, tag: str) -> dict[str, type[SpecModel]]:
    """{registered name: spec class} for one discriminated union."""
    inner = get_args(union)[0]
    members = get_args(inner) or (inner,)  # Union[X] of a single member collapses to X
    return {get_args(m.model_fields[tag].annotation)[0]: m for m in members}


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

    @property
    def views(self) -> tuple[DataShape, ...]:
        return (TabularShape(self.FEATURES),)


class DigitsDataset(BundledDataset):
    """8x8 images of handwritten digits, 64 features, 10 classes, 1797 samples (scikit-learn).
    Read as 64 features (mlp), a 1x8x8 image (cnn) or a sequence of 8 rows of 8 pixels."""

    SIZE, FEATURES, CLASSES = 1797, 64, 10
    name: Literal["digits"]

    @property
    def views(self) -> tuple[DataShape, ...]:
        # Tabular first: the mlp keeps reading the flat 64 pixels, standardised per pixel.
        return (TabularShape(64), ImageShape(1, 8, 8), SequenceShape(8, features=8))


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

    @property
    def views(self) -> tuple[DataShape, ...]:
        return (TabularShape(self.n_features),)


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


class TokenSequenceDataset(SpecModel):
    """A generated sequence of token ids; the job's seed makes it reproducible."""

    n_samples: int = Field(2000, ge=20, le=1_000_000, description="Number of sequences generated.")
    length: int = Field(30, ge=2, le=10_000, description="Steps per sequence (T).")
    val_fraction: ValFraction = 0.2

    @property
    def vocab(self) -> int:
        raise NotImplementedError

    @property
    def n_features(self) -> int:
        return self.length  # one token id per step, before any model reads it one-hot

    @property
    def views(self) -> tuple[DataShape, ...]:
        return (SequenceShape(self.length, vocab=self.vocab),)


class SequenceMemoryDataset(TokenSequenceDataset):
    """Remember the first token: a class token (0..classes-1) first, then length-1 random
    distractor tokens (ids from classes on). A test of memory: the class must survive every
    later step, which gated cells (lstm, gru) are built for and a plain rnn has to learn."""

    name: Literal["sequence_memory"]
    classes: int = Field(4, ge=2, le=100, description="Number of class tokens (classes).")
    distractors: int = Field(4, ge=1, le=1000, description="Number of distinct distractor tokens.")

    @property
    def n_classes(self) -> int:
        return self.classes

    @property
    def vocab(self) -> int:
        return self.classes + self.distractors  # class tokens first, distractor tokens after


class SequenceParityDataset(TokenSequenceDataset):
    """Parity of a random bit sequence: class 1 when it holds an odd number of 1s (tokens 0 and 1)."""

    name: Literal["sequence_parity"]
    length: int = Field(20, ge=2, le=10_000, description="Bits per sequence (T).")

    @property
    def n_classes(self) -> int:
        return 2

    @property
    def vocab(self) -> int:
        return 2


class RandomCrop(SpecModel):
    """Pad each side with zeros (black), then crop back to the image's size at a random offset."""

    padding: int = Field(4, ge=1, le=16, description="Pixels of zero padding on each side.")


class Cutout(SpecModel):
    """Zero a square patch (the mean, after normalisation) centred at a random pixel
    (DeVries & Taylor, 2017); near the border the square is clipped."""

    size: int = Field(8, ge=1, le=32, description="Side of the square, in pixels.")


class Augment(SpecModel):
    """Augmentation of the training batches, on the device, per sample, drawn from the job's own
    generator: the same seed gives the same batches, and a resumed job continues the same draws."""

    random_crop: RandomCrop | None = Field(None, description='Random crop after zero padding: {"padding": 4}.')
    horizontal_flip: bool = Field(False, description="Flip each image left-right with probability 1/2.")
    cutout: Cutout | None = Field(None, description='Cutout: {"size": 8}.')

    @property
    def active(self) -> bool:
        return self.random_crop is not None or self.horizontal_flip or self.cutout is not None

    @property
    def names(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) not in (None, False)]


HOLD_OUT = "val_fraction"  # `validation: "val_fraction"` names the held-out split explicitly


def _validation_choice(value: Any) -> str | float:  # noqa: ANN401
    """One error naming `validation` (a plain union would report one per member)."""
    if isinstance(value, str) and value in ("test", HOLD_OUT):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    raise PydanticCustomError(
        "validation_choice", '"test", "val_fraction" or a fraction between 0 and 1 (exclusive), not {value!r}',
        {"value": value},
    )


ValidationChoice = Annotated[
    str | float,
    PlainValidator(_validation_choice),
    WithJsonSchema(
        {"anyOf": [{"enum": ["test", HOLD_OUT]}, {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}]}
    ),
]


class ImageDataset(SpecModel):
    """A standard image set read through torchvision's dataset classes from the dataset cache
    (DATASETS_DIR); a worker that lacks it downloads it there (checksums verified)."""

    TRAIN: ClassVar[int]  # samples of the official training split
    TEST: ClassVar[int]  # samples of the official test split
    CHANNELS: ClassVar[int]
    SIDE: ClassVar[int]
    CLASSES: ClassVar[int]
    validation: ValidationChoice = Field(
        "test",
        description='"test": the official test split is the validation set (as papers report); a fraction '
        "(or \"val_fraction\" with val_fraction set): that share of the training split is held out "
        "instead (stratified, seeded).",
    )
    val_fraction: ValFraction | None = Field(
        None, description="The share of the training split held out for validation (same as validation: <fraction>)."
    )
    subset: int | None = Field(
        None, ge=2, description="Train on a stratified, seeded subset of this many training samples."
    )
    augment: Augment = Field(Augment(), description="Augmentation of the training batches, on the device.")

    @model_validator(mode="after")
    def _one_validation(self) -> ImageDataset:
        """Normalised so the stored spec says it one way: validation and val_fraction agree."""
        validation, fraction = self.validation, self.val_fraction
        said_validation = "validation" in self.model_fields_set
        if validation == HOLD_OUT and fraction is None:
            raise spec_error("dataset.val_fraction", 'validation "val_fraction" needs val_fraction, e.g. 0.1')
        if validation == "test" and fraction is not None and said_validation:
            raise spec_error(
                "dataset.val_fraction",
                f'validation "test" validates on the official test split; val_fraction {fraction} would '
                "hold out part of the training split instead: give one of the two",
            )
        if isinstance(validation, float) and fraction is not None and fraction != validation:
            raise spec_error(
                "dataset.val_fraction", f"validation {validation} and val_fraction {fraction} disagree: give one"
            )
        held_out = fraction if fraction is not None else validation if isinstance(validation, float) else None
        object.__setattr__(self, "validation", "test" if held_out is None else held_out)
        object.__setattr__(self, "val_fraction", held_out)
        n_train = self.TRAIN - (0 if held_out is None else math.ceil(self.TRAIN * held_out))
        if self.subset is not None and self.subset > n_train:
            raise spec_error(
                "dataset.subset",
                f"subset {self.subset} is more than the {n_train} training samples "
                f"{self.name} has{'' if held_out is None else f' after val_fraction {held_out}'}",
            )
        return self

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(train, validation) samples: the validation split is the test split or held out of training."""
        return self.sizes_of(self.TRAIN, self.TEST)

    def sizes_of(self, official_train: int, official_test: int) -> tuple[int, int]:
        """(train, validation) samples taken from official splits of these sizes: the one rule
        the spec (with the official sizes) and the trainer (with the files it reads) share."""
        if self.val_fraction is None:
            n_train, n_val = official_train, official_test
        else:
            n_val = math.ceil(official_train * self.val_fraction)
            n_train = official_train - n_val
        return (n_train if self.subset is None else self.subset), n_val

    @property
    def n_samples(self) -> int:
        """Samples on the device: the training samples used and the validation split."""
        return sum(self.split_sizes)

    @property
    def n_classes(self) -> int:
        return self.CLASSES

    @property
    def n_features(self) -> int:
        return self.CHANNELS * self.SIDE * self.SIDE

    @property
    def image(self) -> ImageShape:
        return ImageShape(self.CHANNELS, self.SIDE, self.SIDE)

    @property
    def views(self) -> tuple[DataShape, ...]:
        return (self.image, TabularShape(self.n_features))


class MNISTFamilyDataset(ImageDataset):
    """28x28 grey images, 10 classes, 60,000 training and 10,000 test samples."""

    TRAIN, TEST, CHANNELS, SIDE, CLASSES = 60_000, 10_000, 1, 28, 10

    @property
    def views(self) -> tuple[DataShape, ...]:
        # Tabular first, as for digits: the mlp reads 784 pixels; cnn and resnet the image;
        # the rnn family and the transformer the 28 rows as steps of 28 pixels.
        return (TabularShape(784), self.image, SequenceShape(28, features=28))


class MNISTDataset(MNISTFamilyDataset):
    """MNIST handwritten digits (LeCun et al.): 1x28x28, 10 classes, 60k training / 10k test."""

    name: Literal["mnist"]


class FashionMNISTDataset(MNISTFamilyDataset):
    """Fashion-MNIST (Zalando): 1x28x28 images of clothing, 10 classes, 60k training / 10k test."""

    name: Literal["fashion_mnist"]


class KMNISTDataset(MNISTFamilyDataset):
    """Kuzushiji-MNIST: 1x28x28 cursive Japanese characters, 10 classes, 60k training / 10k test."""

    name: Literal["kmnist"]


class CIFARDataset(ImageDataset):
    """32x32 colour images, 50,000 training and 10,000 test samples."""

    TRAIN, TEST, CHANNELS, SIDE = 50_000, 10_000, 3, 32

    @property
    def views(self) -> tuple[DataShape, ...]:
        return (TabularShape(3072), self.image)


class CIFAR10Dataset(CIFARDataset):
    """CIFAR-10 (Krizhevsky, 2009): 3x32x32 colour images, 10 classes, 50k training / 10k test."""

    CLASSES = 10
    name: Literal["cifar10"]


class CIFAR100Dataset(CIFARDataset):
    """CIFAR-100 (Krizhevsky, 2009): 3x32x32 colour images, 100 fine classes, 50k training / 10k test."""

    CLASSES = 100
    name: Literal["cifar100"]


BuiltinDatasetSpec = Annotated[
    Union[
        DigitsDataset,
        IrisDataset,
        WineDataset,
        BreastCancerDataset,
        MoonsDataset,
        BlobsDataset,
        SpiralsDataset,
        SequenceMemoryDataset,
        SequenceParityDataset,
        MNISTDataset,
        FashionMNISTDataset,
        KMNISTDataset,
        CIFAR10Dataset,
        CIFAR100Dataset,
    ],
    Field(discriminator="name"),
]


class UploadedDataset(SpecModel):
    """A dataset uploaded with POST /v1/datasets, named by its id: {"id": ..., "val_fraction": 0.2}.
    At submission the server fills in the rest from the stored dataset (replacing whatever a
    client sent there), so the stored spec validates anywhere without a database. The class
    names stay with the dataset (GET /v1/datasets/{id}): a spec counts them, it does not copy them."""

    id: str = Field(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
        description="The dataset's id, as POST /v1/datasets returned it.",
    )
    val_fraction: ValFraction = 0.2
    # Filled in by the server at submission:
    name: NulFreeStr = Field("", max_length=200, description="The upload's name.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the uploaded file.")
    n_samples: int = Field(ge=2, description="Rows, one sample each.")
    n_classes: int = Field(ge=2, description="Number of classes (their names are the dataset's).")
    shape: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, max_length=3, description="One sample's shape: [F], [T, F] or [C, H, W]."
    )

    @property
    def n_features(self) -> int:
        return math.prod(self.shape)

    @property
    def views(self) -> tuple[DataShape, ...]:
        if len(self.shape) == 1:
            return (TabularShape(self.shape[0]),)
        if len(self.shape) == 2:
            return (SequenceShape(self.shape[0], features=self.shape[1]),)
        return (ImageShape(*self.shape),)


UPLOADED = "uploaded"  # the union tag of an uploaded dataset (a dataset spec with an `id`)


def name_or_id(value: Any) -> str | None:
    """A dataset with an `id` is an upload; any other is named by its registered `name`."""
    if isinstance(value, dict):
        return UPLOADED if "id" in value else value.get("name")
    return UPLOADED if isinstance(value, UploadedDataset) else getattr(value, "name", None)


# Built-in datasets by `name`, uploads by `id`: tagged by a function, not by one field.
DatasetSpec = Annotated[
    Union[
        (
            *(Annotated[cls, Tag(name)] for name, cls in members_by_tag(BuiltinDatasetSpec, "name").items()),
            Annotated[UploadedDataset, Tag(UPLOADED)],
        )
    ],
    Discriminator(name_or_id),
]

# --------------------------------------------------------------------------- models


class ArchModel(SpecModel):
    """What every model spec says besides its fields: the data it takes and its size."""

    TAKES: ClassVar[tuple[ShapeKind, ...]]

    def check_input(self, shape: DataShape) -> None:
        """Raise a spec_error when this configuration cannot read data of this shape."""

    def smallest_batch(self, shape: DataShape) -> int:
        """Fewest samples a training batch of this shape may hold."""
        return 1

    def n_parameters(self, shape: DataShape, n_classes: int) -> int:
        """Exactly sum(p.numel()) of the module trainer/models.py builds for this input."""
        raise NotImplementedError


def _dense_parameters(widths: list[int]) -> int:
    return sum(w_in * w_out + w_out for w_in, w_out in zip(widths, widths[1:]))


class MLPModel(ArchModel):
    """Multi-layer perceptron: Linear layers with an activation and dropout between them.
    Reads any data flat; token ids one-hot."""

    TAKES = (ShapeKind.tabular, ShapeKind.image, ShapeKind.sequence)
    arch: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        [128, 64], min_length=0, max_length=16, description="Width of each hidden layer."
    )
    activation: Literal["relu", "tanh", "gelu", "sigmoid", "leaky_relu", "elu"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability after each hidden layer.")

    def n_parameters(self, shape: DataShape | int, n_classes: int) -> int:
        """Weights and biases of the Linear layers; an int is a count of flat features."""
        n_inputs = shape if isinstance(shape, int) else shape.flat_size
        return _dense_parameters([n_inputs, *self.hidden, n_classes])


class CNNModel(ArchModel):
    """Convolutional network: blocks of conv (same padding) -> batch norm -> ReLU -> 2x2 max pool,
    then dense layers on the flattened maps."""

    TAKES = (ShapeKind.image,)
    arch: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        [16, 32], min_length=1, max_length=8, description="Output channels of each conv block (each halves H and W)."
    )
    kernel_size: int = Field(3, ge=1, le=11, description="Side of the square kernels; odd, so padding keeps the size.")
    hidden: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        [64], min_length=0, max_length=8, description="Width of each dense layer after the conv blocks."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability before each dense layer.")

    @model_validator(mode="after")
    def _odd_kernel(self) -> CNNModel:
        if self.kernel_size % 2 == 0:
            raise spec_error("model.kernel_size", f"kernel_size must be odd (got {self.kernel_size})")
        return self

    def check_input(self, shape: DataShape) -> None:
        assert isinstance(shape, ImageShape)
        blocks = len(self.channels)
        if min(shape.height, shape.width) < 2**blocks:
            raise spec_error(
                "model.channels",
                f"{blocks} conv blocks halve the image {blocks} times: they need images of at least "
                f"{2**blocks}x{2**blocks}; the data is {shape}",
            )

    def n_parameters(self, shape: DataShape, n_classes: int) -> int:
        assert isinstance(shape, ImageShape)
        total, c_in = 0, shape.channels
        for c_out in self.channels:  # conv without bias (batch norm's shift replaces it), BN weight and bias
            total += c_in * c_out * self.kernel_size**2 + 2 * c_out
            c_in = c_out
        shrink = 2 ** len(self.channels)
        flat = c_in * (shape.height // shrink) * (shape.width // shrink)
        return total + _dense_parameters([flat, *self.hidden, n_classes])


class RecurrentModel(ArchModel):
    """Fields shared by rnn, lstm and gru."""

    TAKES = (ShapeKind.sequence,)
    GATES: ClassVar[int]  # weight blocks per layer and direction, as torch stacks them
    hidden_size: int = Field(64, ge=1, le=4096, description="Width of the hidden state.")
    num_layers: int = Field(1, ge=1, le=16, description="Stacked recurrent layers.")
    bidirectional: bool = Field(False, description="Also read the sequence backwards; states concatenated.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability between layers and before the head.")
    pooling: Literal["last", "mean"] = Field(
        "last", description="Classify from the final hidden state ('last') or the mean of all states ('mean')."
    )

    def n_parameters(self, shape: DataShape, n_classes: int) -> int:
        assert isinstance(shape, SequenceShape)
        directions = 2 if self.bidirectional else 1
        h, total, n_in = self.hidden_size, 0, shape.step_size
        for _ in range(self.num_layers):
            # weight_ih, weight_hh, bias_ih, bias_hh per direction
            total += directions * self.GATES * h * (n_in + h + 2)
            n_in = h * directions
        return total + _dense_parameters([h * directions, n_classes])


class RNNModel(RecurrentModel):
    """Plain (Elman) RNN with tanh, classifying from the last or the mean-pooled hidden state.
    Token ids are read one-hot; dropout is applied between layers and before the dense head."""

    GATES = 1
    arch: Literal["rnn"]


class LSTMModel(RecurrentModel):
    """LSTM: gated cell state that carries information over long sequences.
    Token ids are read one-hot; dropout is applied between layers and before the dense head;
    the forget and input gates start with chrono initialisation over the sequence's length."""

    GATES = 4
    arch: Literal["lstm"]


class GRUModel(RecurrentModel):
    """GRU: gated recurrent unit, an LSTM with fewer gates and no separate cell state.
    Token ids are read one-hot; dropout is applied between layers and before the dense head;
    the update gate starts with chrono initialisation over the sequence's length."""

    GATES = 3
    arch: Literal["gru"]


class TransformerModel(ArchModel):
    """BERT-style encoder: token (or linear feature) embedding plus learned positions, a [CLS]
    token, pre-norm blocks of multi-head self-attention and a GELU MLP with residuals, the
    [CLS] token's final state into a dense head."""

    TAKES = (ShapeKind.sequence,)
    arch: Literal["transformer"]
    d_model: int = Field(64, ge=1, le=4096, description="Width of the token states.")
    num_heads: int = Field(4, ge=1, le=64, description="Attention heads; must divide d_model.")
    num_layers: int = Field(2, ge=1, le=48, description="Encoder blocks.")
    ff_dim: int = Field(128, ge=1, le=16384, description="Hidden width of each block's MLP.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout probability on the embeddings, attention weights and in each block."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TransformerModel:
        if self.d_model % self.num_heads != 0:
            raise spec_error(
                "model.num_heads", f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})"
            )
        return self

    def n_parameters(self, shape: DataShape, n_classes: int) -> int:
        assert isinstance(shape, SequenceShape)
        d, ff = self.d_model, self.ff_dim
        embedding = shape.vocab * d if shape.tokens else shape.features * d + d  # type: ignore[operator]
        cls_and_positions = d + (shape.length + 1) * d
        attention = 3 * d * d + 3 * d + d * d + d  # in-projection (q, k, v) and out-projection
        mlp = d * ff + ff + ff * d + d
        block = attention + mlp + 2 * (2 * d)  # two LayerNorms
        return embedding + cls_and_positions + self.num_layers * block + 2 * d + d * n_classes + n_classes


class ResNetModel(ArchModel):
    """ResNet (He et al., 2016), torchvision's with basic blocks: a stem, four stages of residual
    blocks (64, 128, 256, 512 channels times width; stages 2-4 halve H and W), global average
    pooling, a dense head. Images up to 64 px get the small-image (CIFAR) stem: a 3x3 conv,
    stride 1, no max-pool; larger ones torchvision's ImageNet stem: a 7x7 conv, stride 2, max-pool."""

    TAKES = (ShapeKind.image,)
    STAGES: ClassVar[dict[int, tuple[int, ...]]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}  # blocks per stage
    SMALL_STEM_MAX_SIDE: ClassVar[int] = 64
    MIN_SIDE: ClassVar[int] = 8  # the small stem's stages halve 3 times: 8x8 leaves 1x1 for the last
    arch: Literal["resnet"]
    depth: Literal[18, 34] = Field(18, description="18 or 34 layers: 2-2-2-2 or 3-4-6-3 basic blocks per stage.")
    width: float = Field(
        1.0,
        ge=0.125,
        le=4,
        description="Multiplier of every stage's channels (64, 128, 256, 512); 64 x width must be a whole number.",
    )

    @model_validator(mode="after")
    def _whole_channels(self) -> ResNetModel:
        if not (64 * self.width).is_integer():  # refused, not rounded: the channels are what was asked
            raise spec_error("model.width", f"64 x width must be a whole number of channels (got {64 * self.width})")
        return self

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(c * self.width) for c in (64, 128, 256, 512))

    def small_stem(self, shape: ImageShape) -> bool:
        return min(shape.height, shape.width) <= self.SMALL_STEM_MAX_SIDE

    def check_input(self, shape: DataShape) -> None:
        assert isinstance(shape, ImageShape)
        if min(shape.height, shape.width) < self.MIN_SIDE:
            raise spec_error(
                "model.arch",
                f"resnet's stages halve the image 3 times: it needs images of at least "
                f"{self.MIN_SIDE}x{self.MIN_SIDE}; the data is {shape}",
            )

    def smallest_batch(self, shape: DataShape) -> int:
        # Images up to 8x8 reach the last stage as 1x1 maps: batch norm there needs 2 samples.
        assert isinstance(shape, ImageShape)
        return 2 if self.small_stem(shape) and max(shape.height, shape.width) <= self.MIN_SIDE else 1

    def n_parameters(self, shape: DataShape, n_classes: int) -> int:
        assert isinstance(shape, ImageShape)
        c = self.channels
        kernel = 3 if self.small_stem(shape) else 7
        total = kernel**2 * shape.channels * c[0] + 2 * c[0]  # stem conv (no bias) and its batch norm
        c_in = c[0]
        for stage, (c_out, blocks) in enumerate(zip(c, self.STAGES[self.depth])):
            # Each block: two 3x3 convs without bias, each with a batch norm; a stage's first block
            # changes width (stages 2-4) through a 1x1 conv and batch norm on the shortcut.
            total += 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out
            if stage > 0:
                total += c_in * c_out + 2 * c_out
            total += (blocks - 1) * (18 * c_out * c_out + 4 * c_out)
            c_in = c_out
        return total + c_in * n_classes + n_classes


ModelSpec = Annotated[
    Union[MLPModel, CNNModel, RNNModel, LSTMModel, GRUModel, TransformerModel, ResNetModel],
    Field(discriminator="arch"),
]

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


class LRRangeSchedule(SpecModel):
    """The learning-rate range test's ramp: lr grows exponentially from min_lr to optimizer.lr,
    one step at a time; training stops once the (smoothed) loss exceeds stop_factor times
    its best, and a loss that explodes ends the run instead of failing it."""

    name: Literal["lr_range"]
    min_lr: float = Field(1e-6, gt=0, description="Learning rate at the first step.")
    stop_factor: float = Field(4.0, gt=1, le=1000, description="Stop once the loss exceeds this many times its best.")


ScheduleSpec = Annotated[
    Union[
        ConstantSchedule,
        StepSchedule,
        ExponentialSchedule,
        CosineSchedule,
        WarmupLinearSchedule,
        WarmupCosineSchedule,
        InverseSqrtSchedule,
        LRRangeSchedule,
    ],
    Field(discriminator="name"),
]

# --------------------------------------------------------------------------- losses


class Precision(StrEnum):
    """The number format of the forward and backward passes (the weights and the optimizer stay fp32)."""

    fp32 = "fp32"  # today's exact arithmetic: bit-identical runs on CPU
    tf32 = "tf32"  # fp32 tensors, TF32 matrix multiplies and convolutions on CUDA (Ampere and later)
    bf16 = "bf16"  # autocast to bfloat16 (CUDA; CPU where torch supports it)
    fp16 = "fp16"  # autocast to float16 with a gradient scaler (CUDA only)


# Precisions that run only on CUDA: on a CPU they would either fail or silently mean fp32.
CUDA_ONLY_PRECISIONS = (Precision.tf32, Precision.fp16)


class LossName(StrEnum):
    cross_entropy = "cross_entropy"
    mse = "mse"


LOSS_DESCRIPTIONS: dict[LossName, str] = {
    LossName.cross_entropy: "Cross-entropy between the softmax of the logits and the label.",
    LossName.mse: "Mean squared error between the softmax output and the one-hot label.",
}

# --------------------------------------------------------------------------- diagnostics

ADAPTIVE_OPTIMIZERS = ("adagrad", "rmsprop", "adam", "adamw")  # the ones with a per-parameter step size
EvalSamples = Annotated[
    int,
    Field(
        ge=1,
        le=1_000_000,
        description="Training samples the loss is evaluated on; a larger training set is subsampled "
        "(a fixed subset drawn from the job's seed).",
    ),
]


class HessianDiagnostic(SpecModel):
    """Extreme eigenvalues of the training loss's Hessian (Lanczos on Hessian-vector products),
    and a verdict: local_minimum, saddle_point, not_critical or no_finite_minimum (trainer/hessian.py)."""

    at: Literal["end"] = Field("end", description="Always computed at the end of training.")
    every_epochs: int | None = Field(
        None, ge=1, le=100_000, description="Also every this many epochs (metrics only; the verdict is the end's)."
    )
    top_k: int = Field(10, ge=1, le=100, description="Eigenvalues of largest magnitude computed.")
    max_samples: EvalSamples = 2048
    gradient_tolerance: float = Field(
        1e-2,
        gt=0,
        le=1,
        description="not_critical (no_finite_minimum when every sample is classified right) when a gradient "
        "step of 1/lambda_max would lower the loss by more than this share of it: |grad|^2 / (2 lambda_max) > this * loss.",
    )
    curvature_tolerance: float = Field(
        1e-2,
        gt=0,
        lt=1,
        description="saddle_point when the smallest eigenvalue is below -this times the largest |eigenvalue|.",
    )


class LandscapeDiagnostic(SpecModel):
    """Loss along slices of weight space (Li et al., 2018): 1d from the initial to the final weights,
    2d around the final weights along two filter-normalised random directions."""

    kind: Literal["1d", "2d", "both"] = "both"
    resolution: int = Field(21, ge=3, le=101, description="Points per axis (2d: resolution^2 evaluations).")
    span: float = Field(1.0, gt=0, le=100, description="2d: half-width of the grid, in units of the directions.")
    max_samples: EvalSamples = 2048


class DiagnosticsSpec(SpecModel):
    """What the optimizer is doing: all off by default; when off, training does no extra work."""

    every_steps: int = Field(10, ge=1, le=1_000_000, description="Interval of the in-loop probes below.")
    layer_grad_norms: bool = Field(False, description="grad_norm/<parameter>: each parameter tensor's gradient norm.")
    update_ratio: bool = Field(False, description="update_ratio/<parameter>: ||update|| / ||weights|| per tensor.")
    effective_lr: bool = Field(
        False, description="effective_lr_p10/_median/_p90 of lr / (sqrt(v_hat) + eps) (adaptive optimizers only)."
    )
    per_class: bool = Field(False, description="Validation precision, recall, F1 per class and macro-F1 at the end.")
    hessian: HessianDiagnostic | None = None
    landscape: LandscapeDiagnostic | None = None

    @property
    def in_loop(self) -> bool:
        return self.layer_grad_norms or self.update_ratio or self.effective_lr


# --------------------------------------------------------------------------- the job


class Resources(SpecModel):
    """Where a job may run. `device` (on the spec) keeps its meaning inside the pool."""

    pool: str = Field(
        DEFAULT_POOL,
        min_length=1,
        max_length=POOL_NAME_MAX_LENGTH,
        pattern=POOL_NAME_PATTERN,
        description="The device pool whose workers run the job (a worker serves the pool WORKER_POOL names): "
        "lower-case letters, digits and '-'.",
    )


class JobSpec(SpecModel):
    """Everything needed to run one training job, with every default filled in."""

    name: str = Field(
        "job",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$",
        description="A label for people: letters, digits, space, '_', '-', '.'.",
    )
    experiment: NulFreeStr | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="MLflow experiment, kept as `<project>/<experiment>`; the server's default when absent.",
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
    precision: Precision = Field(
        Precision.fp32,
        strict=False,  # the name as a string is the enum
        description="fp32 (exact) | tf32 | bf16 | fp16 (CUDA; bf16 also on CPU): faster, not bit-exact.",
    )
    compile: bool = Field(
        False, description="torch.compile the model: compile time is reported as compile_seconds, then faster steps."
    )
    checkpoint_every_steps: int = Field(
        200, ge=1, le=10_000_000, description="Checkpoint interval (also at every epoch end), for crash recovery."
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Runs of the job before a lost worker fails it.")
    timeout_s: float | None = Field(None, gt=0, le=30 * 24 * 3600, description="Fail the job after this long.")
    diagnostics: DiagnosticsSpec = Field(
        DiagnosticsSpec(), description="Diagnostics of what the optimizer is doing (all off by default)."
    )
    resources: Resources = Field(Resources(), description="Where the job runs: its device pool.")

    # -- sizes, computed once so the API, the trainer and the schedules agree

    @property
    def split_sizes(self) -> tuple[int, int]:
        """(train, validation) sample counts; validation rounds up, as scikit-learn does."""
        if isinstance(self.dataset, ImageDataset):
            return self.dataset.split_sizes
        n = self.dataset.n_samples
        n_val = math.ceil(n * self.dataset.val_fraction)
        return n - n_val, n_val

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.split_sizes[0] / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def input_shape(self) -> DataShape:
        """The view of the dataset the model reads: the dataset's first view of a kind the model takes."""
        return next(v for v in self.dataset.views if v.kind in self.model.TAKES)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.experiment is not None and "/" in self.experiment:
            # The server files every experiment under its project; a '/' would read as a path into another's.
            raise spec_error(
                "experiment",
                f"'/' is reserved: the experiment is kept in MLflow as '<project>/{self.experiment}', "
                "under your project; name it without '/'",
            )
        if not any(v.kind in self.model.TAKES for v in self.dataset.views):
            views = either([str(v) for v in self.dataset.views])
            raise spec_error(
                "model.arch",
                f"{self.model.arch} takes {either([str(k) for k in self.model.TAKES])} data; "
                f"dataset '{self.dataset.name}' is {views}",
            )
        self.model.check_input(self.input_shape)
        n_train, n_val = self.split_sizes
        smallest, last = self.model.smallest_batch(self.input_shape), n_train % self.batch_size or self.batch_size
        if min(last, n_train) < smallest:
            raise spec_error(
                "batch_size",
                f"{self.model.arch} on {self.input_shape} trains on batches of at least {smallest} samples; "
                f"batch_size {self.batch_size} leaves a last batch of {min(last, n_train)} of the {n_train} "
                "training samples",
            )
        classes = self.dataset.n_classes
        if isinstance(self.dataset, ImageDataset):
            self._check_image_dataset(self.dataset)
        elif min(n_train, n_val) < classes:
            raise spec_error(
                "dataset.val_fraction",
                f"val_fraction {self.dataset.val_fraction} leaves {n_train} training and {n_val} "
                f"validation samples; each split needs at least one sample per class ({classes})",
            )
        if self.precision in CUDA_ONLY_PRECISIONS and self.device == "cpu":
            raise spec_error(
                "precision",
                f"{self.precision} runs on CUDA only; on device cpu use fp32 (exact) or bf16 (autocast)",
            )
        warmup = getattr(self.schedule, "warmup_steps", None)
        if warmup is not None and warmup >= self.total_steps:
            raise spec_error(
                "schedule.warmup_steps",
                f"warmup_steps ({warmup}) must be shorter than the run: {self.epochs} epochs x "
                f"{self.steps_per_epoch} steps = {self.total_steps} steps",
            )
        if self.diagnostics.effective_lr and self.optimizer.name not in ADAPTIVE_OPTIMIZERS:
            raise spec_error(
                "diagnostics.effective_lr",
                f"effective_lr needs an adaptive optimizer ({', '.join(ADAPTIVE_OPTIMIZERS)}): "
                f"{self.optimizer.name} steps every parameter with the same lr",
            )
        min_lr = getattr(self.schedule, "min_lr", None)
        if min_lr is not None and min_lr >= self.optimizer.lr:
            raise spec_error(
                "schedule.min_lr", f"min_lr ({min_lr}) must be below optimizer.lr ({self.optimizer.lr})"
            )
        return self

    def _check_image_dataset(self, dataset: ImageDataset) -> None:
        n_train, n_val = self.split_sizes
        if n_train < dataset.n_classes:
            raise spec_error(
                "dataset.subset",
                f"subset {dataset.subset} is fewer samples than {dataset.name}'s {dataset.n_classes} classes: "
                "the stratified subset needs at least one sample of each",
            )
        if n_val < dataset.n_classes:
            raise spec_error(
                "dataset.val_fraction",
                f"val_fraction {dataset.val_fraction} holds out {n_val} samples, fewer than {dataset.name}'s "
                f"{dataset.n_classes} classes: the stratified split needs at least one of each",
            )
        augment = dataset.augment
        if augment.active and self.input_shape.kind == ShapeKind.sequence:
            raise spec_error(
                "dataset.augment",
                f"{self.model.arch} reads {dataset.name} as a sequence of rows: crops, flips and cutout are "
                f"image augmentations ({', '.join(augment.names)}); read the image with a cnn, resnet or mlp",
            )
        if augment.cutout is not None and augment.cutout.size > dataset.SIDE:
            raise spec_error(
                "dataset.augment.cutout.size",
                f"cutout size {augment.cutout.size} is larger than {dataset.name}'s {dataset.SIDE}x{dataset.SIDE} images",
            )
        if augment.random_crop is not None and augment.random_crop.padding >= dataset.SIDE:
            raise spec_error(
                "dataset.augment.random_crop.padding",
                f"padding {augment.random_crop.padding} is not smaller than the {dataset.SIDE}-pixel image",
            )

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


DATASETS = members_by_tag(BuiltinDatasetSpec, "name")
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
