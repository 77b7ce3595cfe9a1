"""The search and pruning side of a study, done by Optuna (its samplers, pruners and
ask-and-tell interface, with its own tables as storage so that the API, every worker
and the reaper share one view). One Optuna trial per trial job: a configuration run
with three seeds is three Optuna trials with the same values.

Pruning that is fair to schedules: a trial reports its objective at tenths of its OWN
schedule (10 %, 20 %, ... of its total steps), never at raw steps, so a warm-up or
a cosine run is compared with others at the same point of their plans, and a run of
3 epochs with one of 5. The value reported at each tenth is the objective as last
measured (at an epoch's end) at or before it. No trial is pruned before `min_epochs`
or while its learning rate is still warming up (the worker checks both).

Torch-free.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime
from functools import lru_cache
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from jobs.settings import settings
from jobs.study_spec import (
    GridDimension,
    GridSearch,
    IntDimension,
    LogUniformDimension,
    RandomSearch,
    StudySpec,
    TPESearch,
    UniformDimension,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

SCHEDULE_POINTS = tuple(range(10, 101, 10))  # percent of a trial's own schedule


@lru_cache(maxsize=4)
def storage(url: str | None = None) -> optuna.storages.RDBStorage:
    url = url or settings.optuna_storage_url
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        # Optuna has a table named `studies` too: its tables live in their own schema.
        engine_kwargs = {"connect_args": {"options": "-csearch_path=optuna"}, "pool_pre_ping": True}
    elif url.startswith("sqlite"):
        settings.ensure_home()
        engine_kwargs = {"connect_args": {"timeout": 30}}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def warm_storage() -> None:
    """Build the Optuna storage now, at a process's start, rather than in its first study
    or trial: the first one in a process costs 0.1-0.4 s (SQLAlchemy's first connection,
    Optuna's table check and schema-version check; on a new database it also creates the
    tables), measured on this project's 2-core machine. Its pooled connection is closed
    again, so that children forked afterwards (the worker's) inherit no socket; they keep
    the rest. Unreachable now: the first use builds it, as before."""
    try:
        storage().engine.dispose()
    except Exception as exc:  # noqa: BLE001 - a service starts whether or not the database is up yet
        log.warning("Optuna storage not reachable at start (%s); the first study or trial connects", exc)


def optuna_name(study_id: object) -> str:
    return f"descent-{study_id}"


def sampler_for(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    if isinstance(spec.search, TPESearch):
        # constant_liar: with several trials running, TPE does not propose the same point to each.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.search.n_startup_trials, constant_liar=True)
    # grid: every configuration is enqueued with its values, the sampler only fills them in.
    return optuna.samplers.RandomSampler(seed=seed)


def pruner_for(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruning.method == "median":
        # Once as many trials ended as one configuration has seeds, and one more.
        return optuna.pruners.MedianPruner(n_startup_trials=spec.repeats + 1, n_warmup_steps=0, interval_steps=1)
    if spec.pruning.method == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=SCHEDULE_POINTS[0], reduction_factor=spec.pruning.reduction_factor
        )
    return optuna.pruners.NopPruner()


def load(study_id: object, spec: StudySpec, seed: int = 0, create: bool = False) -> optuna.Study:
    direction = "maximize" if spec.objective.direction == "max" else "minimize"
    name = optuna_name(study_id)
    if create:
        return optuna.create_study(study_name=name, storage=storage(), direction=direction,
                                   sampler=sampler_for(spec, seed), pruner=pruner_for(spec), load_if_exists=True)  # fmt: skip
    return optuna.load_study(study_name=name, storage=storage(), sampler=sampler_for(spec, seed),
                             pruner=pruner_for(spec))  # fmt: skip


# --------------------------------------------------------------------------- values <-> Optuna params


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """One Optuna distribution per path. Grid values travel as their JSON text, so that any
    JSON value (a list of layer widths, an object) can be a choice."""
    out: dict[str, BaseDistribution] = {}
    for path, dim in spec.space.items():
        if isinstance(dim, GridDimension):
            out[path] = CategoricalDistribution([json.dumps(v, sort_keys=True) for v in dim.grid])
        elif isinstance(dim, UniformDimension):
            out[path] = FloatDistribution(*dim.uniform)
        elif isinstance(dim, LogUniformDimension):
            out[path] = FloatDistribution(*dim.log_uniform, log=True)
        elif isinstance(dim, IntDimension):
            out[path] = IntDistribution(*dim.int_range)
    return out


def to_params(spec: StudySpec, values: dict[str, Any]) -> dict[str, Any]:
    return {p: json.dumps(v, sort_keys=True) if isinstance(spec.space[p], GridDimension) else v for p, v in values.items()}


def from_params(spec: StudySpec, params: dict[str, Any]) -> dict[str, Any]:
    """Values in the space's order."""
    return {p: json.loads(params[p]) if isinstance(dim, GridDimension) else params[p] for p, dim in spec.space.items()}


def ask(study: optuna.Study, spec: StudySpec, values: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """A new trial: with `values` (a grid point, another seed of a configuration) exactly
    those, else what the sampler proposes. (trial number, values)

    Known values make a RUNNING trial in one storage call: Optuna's own way (enqueue the
    values as a waiting trial, then ask, which pops it and has the sampler copy them)
    took about ten times the round trips to the database, under the study's lock, on
    the path from one round of a study's trials to the next."""
    if values is None:
        trial = study.ask(distributions(spec))
        return trial.number, from_params(spec, trial.params)
    params = to_params(spec, values)
    space = distributions(spec)
    template = optuna.trial.FrozenTrial(
        number=-1, trial_id=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.now(),
        datetime_complete=None, params=params, distributions={path: space[path] for path in params}, user_attrs={},
        system_attrs={}, intermediate_values={},
    )  # fmt: skip
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial_number_from_id(trial_id), values


def next_configurations(spec: StudySpec, created: int, wanted: int) -> list[dict[str, Any] | None]:
    """The next `wanted` configurations after the first `created`: grid points for a grid
    (None = let the sampler propose, for random and tpe)."""
    remaining = max(0, spec.n_configurations - created)
    count = min(wanted, remaining)
    if isinstance(spec.search, GridSearch):
        return spec.grid_configurations(created, count)
    if isinstance(spec.search, (RandomSearch, TPESearch)):
        return [None] * count
    return [{}] * count  # the range test: the base spec itself


# --------------------------------------------------------------------------- reports and outcomes


def schedule_points(curve: list[list[float]]) -> dict[int, float]:
    """{percent: objective} at each tenth of the schedule that the curve has reached:
    the objective as last measured at or before it. `curve` rows are [step, percent, value]."""
    if not curve:
        return {}
    reached = curve[-1][1]
    points = {}
    for point in SCHEDULE_POINTS:
        if point > reached + 1e-9:
            break
        measured = [row[2] for row in curve if row[1] <= point + 1e-9]
        if measured and math.isfinite(measured[-1]):
            points[point] = measured[-1]
    return points


def report_and_check(study: optuna.Study, trial_number: int, points: dict[int, float], may_prune: bool) -> bool:
    """Report the trial's new schedule points; True when the pruner says stop."""
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    trial = optuna.trial.Trial(study, trial_id)
    known = study._storage.get_trial(trial_id).intermediate_values
    for point, value in sorted(points.items()):
        if point not in known:
            trial.report(value, point)
    return may_prune and bool(points) and trial.should_prune()


def tell(study: optuna.Study, trial_number: int, value: float | None, pruned: bool) -> None:
    """The trial's end: its final objective, pruned, or failed (no value). A trial Optuna
    already knows has ended (an advance retried after a rollback) is left as it is.

    An objective or a failure is stored in one storage call, as `Study.tell` stores it
    after reading the trial back and calling the sampler's `after_trial`, which does
    nothing for the samplers used here (random, TPE without constraints). A pruned trial
    goes through `Study.tell`, which makes its last reported value its value."""
    storage = study._storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    if pruned:
        if not storage.get_trial(trial_id).state.is_finished():
            study.tell(trial_number, state=TrialState.PRUNED)
        return
    finite = value is not None and math.isfinite(value)
    try:
        storage.set_trial_state_values(
            trial_id, TrialState.COMPLETE if finite else TrialState.FAIL, [float(value)] if finite else None
        )
    except UpdateFinishedTrialError:
        pass  # told already