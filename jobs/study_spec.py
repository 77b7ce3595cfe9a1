"""StudySpec: a comparison in one submission — a base job spec, a search space over
any of its fields, a search method, seeds, an objective and a pruning rule.

A configuration is one set of values for the space's paths; each configuration runs
once per seed (`repeats`), and every one of those runs is an ordinary job. Trials
with the same seed start from the same initial weights and see the same data order
whatever the optimizer: the trainer draws them from the seed alone.

Torch-free (the API imports it).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from jobs.spec import TAGGED_FIELDS, JobSpec, Resources, SpecModel, members_by_tag, spec_error

JSONScalar = Union[str, int, float, bool, None]
JSONValue = Union[JSONScalar, list[Any], dict[str, Any]]
Path = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$", max_length=200)]

# The objectives every trial reports after each epoch (what pruning compares), and
# the direction that is better for each.
OBJECTIVE_MODES: dict[str, Literal["max", "min"]] = {
    "val_accuracy": "max",
    "val_loss": "min",
    "train_accuracy": "max",
}

# --------------------------------------------------------------------------- the space


class GridDimension(SpecModel):
    """Every one of these values (a grid search runs their full product)."""

    grid: list[JSONValue] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _distinct(self) -> GridDimension:
        texts = [json.dumps(v, sort_keys=True) for v in self.grid]
        if len(set(texts)) != len(texts):
            raise ValueError("grid values must be distinct")
        return self


class UniformDimension(SpecModel):
    """A float drawn uniformly from [low, high]."""

    uniform: tuple[float, float] = Field(strict=False)

    @model_validator(mode="after")
    def _ordered(self) -> UniformDimension:
        if not self.uniform[0] < self.uniform[1]:
            raise ValueError("uniform needs [low, high] with low < high")
        return self


class LogUniformDimension(SpecModel):
    """A float drawn uniformly in log space from [low, high]: the way to sample learning rates."""

    log_uniform: tuple[float, float] = Field(strict=False)

    @model_validator(mode="after")
    def _positive_ordered(self) -> LogUniformDimension:
        low, high = self.log_uniform
        if not 0 < low < high:
            raise ValueError("log_uniform needs [low, high] with 0 < low < high")
        return self


class IntDimension(SpecModel):
    """An integer drawn uniformly from [low, high], both included."""

    model_config = ConfigDict(**SpecModel.model_config, serialize_by_alias=True)
    int_range: tuple[int, int] = Field(alias="int", strict=False)

    @model_validator(mode="after")
    def _ordered(self) -> IntDimension:
        if not self.int_range[0] < self.int_range[1]:
            raise ValueError("int needs [low, high] with low < high")
        return self


DIMENSION_KINDS = ("grid", "uniform", "log_uniform", "int")


def _dimension_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((kind for kind in DIMENSION_KINDS if kind in value), None)
    return next((kind for kind in DIMENSION_KINDS if hasattr(value, kind if kind != "int" else "int_range")), None)


Dimension = Annotated[
    Union[
        Annotated[GridDimension, Tag("grid")],
        Annotated[UniformDimension, Tag("uniform")],
        Annotated[LogUniformDimension, Tag("log_uniform")],
        Annotated[IntDimension, Tag("int")],
    ],
    Discriminator(
        _dimension_kind,
        custom_error_type="dimension_kind",
        custom_error_message="a dimension is one of {\"grid\": [...]}, {\"uniform\": [low, high]}, "
        "{\"log_uniform\": [low, high]}, {\"int\": [low, high]}",
    ),
]


def dimension_bounds(dim: Dimension) -> tuple[Any, Any] | None:
    if isinstance(dim, UniformDimension):
        return dim.uniform
    if isinstance(dim, LogUniformDimension):
        return dim.log_uniform
    if isinstance(dim, IntDimension):
        return dim.int_range
    return None


# --------------------------------------------------------------------------- search, objective, pruning

MaxTrials = Annotated[int, Field(ge=1, le=10_000, description="Configurations to try (each runs `repeats` times).")]
Parallelism = Annotated[int, Field(ge=1, le=256, description="Trial jobs queued or running at once.")]
PackSize = Annotated[int, Field(
    ge=1, le=64,
    description="Trials a worker trains together as one pack (one batched computation) when their specs differ "
    "only in packable fields (seed, optimizer hyperparameters, schedule); 1 turns packing off. Packs form among "
    "the study's `parallelism` trials at once, so a pack holds at most min(parallelism, pack_size) trials.",
)]  # fmt: skip


class GridSearch(SpecModel):
    """Every combination of the grid values (the space may only hold grids)."""

    method: Literal["grid"]
    max_trials: MaxTrials | None = Field(None, description="When given, at least the grid's size.")
    parallelism: Parallelism = 4
    pack_size: PackSize = 16


class RandomSearch(SpecModel):
    """Configurations drawn at random (Optuna's RandomSampler, seeded by the base seed)."""

    method: Literal["random"]
    max_trials: MaxTrials = 20
    parallelism: Parallelism = 4
    pack_size: PackSize = 16


class TPESearch(SpecModel):
    """Tree-structured Parzen Estimator (Optuna's TPESampler): random for the first
    n_startup_trials trial jobs, then guided by the objectives seen so far."""

    method: Literal["tpe"]
    max_trials: MaxTrials = 20
    parallelism: Parallelism = 4
    pack_size: PackSize = 16
    n_startup_trials: int = Field(8, ge=1, le=1000, description="Trial jobs sampled at random first.")


class LRRangeTest(SpecModel):
    """One short job whose learning rate grows exponentially from min_lr to max_lr, one
    step at a time; it stops when the loss explodes and suggests a learning rate."""

    method: Literal["lr_range_test"]
    min_lr: float = Field(1e-6, gt=0, le=1e6)
    max_lr: float = Field(10.0, gt=0, le=1e6)
    steps: int = Field(200, ge=10, le=100_000, description="Steps from min_lr to max_lr.")
    stop_factor: float = Field(4.0, gt=1, le=1000, description="Stop once the loss exceeds this many times its best.")

    @model_validator(mode="after")
    def _ordered(self) -> LRRangeTest:
        if self.min_lr >= self.max_lr:
            raise spec_error("search.max_lr", f"max_lr ({self.max_lr}) must be above min_lr ({self.min_lr})")
        return self


SearchSpec = Annotated[Union[GridSearch, RandomSearch, TPESearch, LRRangeTest], Field(discriminator="method")]
SEARCHES = members_by_tag(SearchSpec, "method")


class Objective(SpecModel):
    metric: Literal["val_accuracy", "val_loss", "train_accuracy"] = Field(
        "val_accuracy", description="Read after every epoch (what pruning compares) and at the end (what ranks)."
    )
    mode: Literal["max", "min"] | None = Field(None, description="Better is higher (max) or lower (min); "
                                                                 "default: max for accuracies, min for losses.")  # fmt: skip
    target: float | None = Field(None, description="Report the steps each configuration needed to first reach it.")

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or OBJECTIVE_MODES[self.metric]

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "max" else a < b

    def reached(self, value: float) -> bool:
        assert self.target is not None
        return value >= self.target if self.direction == "max" else value <= self.target


class Pruning(SpecModel):
    method: Literal["none", "median", "asha"] = "none"
    min_epochs: int = Field(1, ge=1, le=100_000, description="No trial is pruned before it trained this many epochs.")
    reduction_factor: int = Field(3, ge=2, le=10, description="asha: keep the best 1/reduction_factor at each rung.")


class StudySpec(SpecModel):
    """Everything needed to run one study."""

    name: str = Field(
        min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$",
        description="Also the name the best model is registered under in MLflow, as `<project>.<name>`.",
    )  # fmt: skip
    base: dict[str, Any] = Field(default_factory=dict, description="A job spec; the space's values replace its fields.")
    space: dict[Path, Dimension] = Field(default_factory=dict, max_length=20)
    search: SearchSpec = Field(default_factory=lambda: GridSearch(method="grid"))
    repeats: int = Field(1, ge=1, le=50, description="Seeds per configuration: base seed, base seed + 1, ...")
    objective: Objective = Field(default_factory=Objective)
    pruning: Pruning = Field(default_factory=Pruning)
    resources: Resources | None = Field(
        None, description="Where every trial runs (its device pool); the same as setting base.resources."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        pooled = [p for p in self.space if p == "resources" or p.startswith("resources.")]
        if pooled:
            raise spec_error(f"space.{pooled[0]}", "a study runs in one device pool: set `resources`, not a space over it")
        base_resources = self.base.get("resources")
        if self.resources is not None and base_resources is not None:
            if not isinstance(base_resources, dict) or base_resources != self.resources.model_dump():
                raise spec_error("resources", "the study's resources and base.resources differ: set one of them")
        if "seed" in self.space:
            raise spec_error("space.seed", "seeds come from `repeats` (base seed, base seed + 1, ...), not the space")
        uploads = [p for p, d in self.space.items() if p == "dataset.id" or (
            p == "dataset" and isinstance(d, GridDimension) and any(isinstance(v, dict) and "id" in v for v in d.grid))]
        if uploads:  # an upload's metadata is resolved from the database once, for the base
            raise spec_error(f"space.{uploads[0]}", "a study runs on one uploaded dataset: name it in base.dataset")
        if isinstance(self.search, GridSearch):
            continuous = [path for path, dim in self.space.items() if not isinstance(dim, GridDimension)]
            if continuous:
                raise spec_error(
                    f"space.{continuous[0]}",
                    f"a grid search needs a grid of values for every path; {continuous[0]} is a range "
                    "(use search.method 'random' or 'tpe', or list the values as a grid)",
                )
            if self.search.max_trials is not None and self.search.max_trials < self.n_configurations:
                raise spec_error(
                    "search.max_trials",
                    f"the grid has {self.n_configurations} configurations but max_trials is "
                    f"{self.search.max_trials}: a grid runs them all (drop max_trials or shrink the grid)",
                )
        if isinstance(self.search, LRRangeTest):
            if self.space:
                raise spec_error("space", "an lr_range_test runs one job on the base spec: leave the space empty")
            if self.pruning.method != "none":
                raise spec_error("pruning.method", "an lr_range_test has nothing to prune")
        return self

    @property
    def n_configurations(self) -> int:
        """Configurations the study will run (grid: the product; otherwise max_trials)."""
        if isinstance(self.search, LRRangeTest):
            return 1
        if isinstance(self.search, GridSearch):
            return math.prod(len(dim.grid) for dim in self.space.values())  # type: ignore[union-attr]
        return self.search.max_trials

    @property
    def pool(self) -> str:
        """The device pool of every trial."""
        if self.resources is not None:
            return self.resources.pool
        base = self.base.get("resources")
        pool = base.get("pool") if isinstance(base, dict) else None
        return pool if isinstance(pool, str) else Resources().pool

    @property
    def n_jobs(self) -> int:
        return self.n_configurations * (1 if isinstance(self.search, LRRangeTest) else self.repeats)

    @property
    def seeds(self) -> list[int]:
        first = int(self.base.get("seed", 0)) if isinstance(self.base.get("seed", 0), int) else 0
        return [first + i for i in range(self.repeats)]

    def grid_configurations(self, start: int = 0, count: int | None = None) -> list[dict[str, Any]]:
        """The grid's configurations (from `start`, `count` of them), in the order the space lists its paths."""
        paths = list(self.space)
        values = [self.space[p].grid for p in paths]  # type: ignore[union-attr]
        stop = None if count is None else start + count
        return [dict(zip(paths, combo)) for combo in itertools.islice(itertools.product(*values), start, stop)]


# --------------------------------------------------------------------------- sampled specs


def _set_path(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set spec[a][b]... = value. Changing a union's tag (`optimizer.name`) keeps only the
    base's fields that the new member also has: `optimizer.lr` survives sgd -> adam,
    `optimizer.nesterov` does not."""
    *parents, leaf = path.split(".")
    node = spec
    for i, key in enumerate(parents):
        child = node.get(key)
        if child is None and i == 0 and key in TAGGED_FIELDS:  # the base left it to the default member
            tag = TAGGED_FIELDS[key][0]
            child = node[key] = {tag: JobSpec.model_fields[key].get_default(call_default_factory=True).model_dump()[tag]}
        elif child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise spec_error(f"space.{path}", f"{'.'.join(parents[: i + 1])} is not an object with fields")
        node = child
    if len(parents) == 1 and parents[0] in TAGGED_FIELDS and leaf == TAGGED_FIELDS[parents[0]][0]:
        registry = TAGGED_FIELDS[parents[0]][1]
        member = registry.get(value) if isinstance(value, str) else None
        if member is not None and node.get(leaf) != value:
            for key in [k for k in node if k != leaf and k not in member.model_fields]:
                del node[key]
    node[leaf] = value


def tag_paths_first(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """Union tags (`optimizer.name`) before the fields that then land in the chosen member."""
    def is_tag(path: str) -> bool:
        head, _, rest = path.partition(".")
        return head in TAGGED_FIELDS and rest == TAGGED_FIELDS[head][0]

    return sorted(values.items(), key=lambda item: not is_tag(item[0]))


def sampled_spec(study: StudySpec, values: dict[str, Any], seed: int) -> JobSpec:
    """The job spec of one trial: the base, the configuration's values, the seed.
    Raises pydantic's ValidationError (or a spec_error for a bad path)."""
    raw = copy.deepcopy(study.base)
    if study.resources is not None:  # the study's resources are every trial's
        raw["resources"] = study.resources.model_dump()
    for path, value in tag_paths_first(values):
        _set_path(raw, path, value)
    raw["seed"] = seed
    raw.setdefault("name", study.name)
    return JobSpec.model_validate(raw)


def config_id(values: dict[str, Any]) -> str:
    """A short, stable id of a configuration: the same values are the same configuration."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def describe_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{path}={json.dumps(value)}" for path, value in values.items()) or "the base spec"


def configurations_to_check(study: StudySpec, most: int) -> Iterator[dict[str, Any]]:
    """What is validated before any trial exists. A grid search: every configuration the
    grid produces (the caller first checks that they are at most MAX_STUDY_TRIALS, and
    passes that as `most`). A sampler: every categorical combination (up to `most`), each
    with every range at its low and at its high end; each configuration the sampler then
    proposes goes through the job gate again when its trials are created."""
    grids = {p: d.grid for p, d in study.space.items() if isinstance(d, GridDimension)}
    ranges = {p: dimension_bounds(d) for p, d in study.space.items() if not isinstance(d, GridDimension)}
    for combo in itertools.islice(itertools.product(*grids.values()), most):
        fixed = dict(zip(grids, combo))
        for end in [0, 1] if ranges else [0]:
            yield fixed | {p: bounds[end] for p, bounds in ranges.items()}  # type: ignore[index]
