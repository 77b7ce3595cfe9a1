"""A study's leaderboard, and whether its winner's lead is real.

Per configuration: the objective's mean and standard deviation over its seeds, the
steps it needed to first reach the target, how its trials ended. Then the question
people actually ask: is the best configuration better than the second, or is the gap
within the seed-to-seed noise? Two answers that agree or not, both reported:
Welch's t-test (no equal-variance assumption) and a bootstrap 95 % interval of the
difference of the means. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from jobs.study_spec import StudySpec

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class TrialRecord:
    """What the leaderboard needs of one trial job."""

    job_id: str
    config_id: str
    values: dict[str, Any]
    seed: int
    status: str
    objective: float | None  # at the end, from a succeeded trial
    curve: list[list[float]] = field(default_factory=list)  # [step, percent of schedule, objective] per epoch


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def steps_to_target(spec: StudySpec, curve: list[list[float]]) -> int | None:
    if spec.objective.target is None:
        return None
    for step, _percent, value in curve:
        if _finite(value) and spec.objective.reached(value):
            return int(step)
    return None


def summarise_configuration(spec: StudySpec, config_id: str, trials: list[TrialRecord]) -> dict[str, Any]:
    values = [t.objective for t in trials if t.status == "succeeded" and _finite(t.objective)]
    arr = np.array(values, dtype=float)
    reach = [steps_to_target(spec, t.curve) for t in trials if t.status == "succeeded"]
    reached = [r for r in reach if r is not None]
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    best = None
    if values:
        scored = [t for t in trials if t.status == "succeeded" and _finite(t.objective)]
        pick = max if spec.objective.direction == "max" else min
        best = pick(scored, key=lambda t: t.objective).job_id  # type: ignore[arg-type, return-value]
    return {
        "config_id": config_id,
        "values": trials[0].values,
        "seeds": sorted(t.seed for t in trials),
        "statuses": statuses,
        "n": len(values),
        "objectives": values,
        "mean": float(arr.mean()) if values else None,
        "std": float(arr.std(ddof=1)) if len(values) > 1 else None,
        "steps_to_target": float(np.mean(reached)) if reached else None,
        "reached_target": f"{len(reached)}/{len(reach)}" if spec.objective.target is not None else None,
        "best_job_id": best,
    }


def compare(spec: StudySpec, first: dict[str, Any], second: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Is `first`'s lead over `second` larger than the noise between seeds?"""
    a, b = np.array(first["objectives"], float), np.array(second["objectives"], float)
    out: dict[str, Any] = {
        "best": first["config_id"], "runner_up": second["config_id"],
        "difference": float(a.mean() - b.mean()), "test": "welch_t", "alpha": ALPHA,
        "p_value": None, "ci95": None, "lead_exceeds_noise": None, "reason": None,
    }  # fmt: skip
    if len(a) < 2 or len(b) < 2:
        out["reason"] = "needs at least 2 finished seeds in both configurations (set repeats >= 2)"
        return out
    if a.std() == 0 and b.std() == 0:
        p = 0.0 if a.mean() != b.mean() else 1.0  # no noise at all: any gap is the whole story
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    rng = np.random.default_rng(seed)
    diffs = rng.choice(a, (BOOTSTRAP_SAMPLES, len(a))).mean(1) - rng.choice(b, (BOOTSTRAP_SAMPLES, len(b))).mean(1)
    low, high = np.quantile(diffs, [ALPHA / 2, 1 - ALPHA / 2])
    better_sign = 1 if spec.objective.direction == "max" else -1
    ci_excludes_zero = bool(low > 0) if better_sign > 0 else bool(high < 0)
    out |= {"p_value": p, "ci95": [float(low), float(high)], "lead_exceeds_noise": bool(p < ALPHA and ci_excludes_zero)}
    if not out["lead_exceeds_noise"]:
        out["reason"] = f"p = {p:.3g}: the gap is within the seed-to-seed noise at alpha {ALPHA}"
    return out


def build_leaderboard(spec: StudySpec, trials: list[TrialRecord]) -> dict[str, Any]:
    """{"configurations": ranked best first, "comparison": best vs runner-up or None}."""
    groups: dict[str, list[TrialRecord]] = {}
    for trial in trials:
        groups.setdefault(trial.config_id, []).append(trial)
    rows = [summarise_configuration(spec, cid, group) for cid, group in groups.items()]
    sign = -1 if spec.objective.direction == "max" else 1
    rows.sort(key=lambda r: (r["mean"] is None, sign * r["mean"] if r["mean"] is not None else 0.0))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank if row["mean"] is not None else None
    ranked = [r for r in rows if r["mean"] is not None]
    comparison = compare(spec, ranked[0], ranked[1]) if len(ranked) >= 2 else None
    return {"metric": spec.objective.metric, "direction": spec.objective.direction, "configurations": rows,
            "comparison": comparison}  # fmt: skip
