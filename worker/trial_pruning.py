"""A running trial's pruning: after each epoch, its objective goes to Optuna at the
tenths of its own schedule it has passed (jobs/study_search.py), and Optuna's pruner
says whether to stop it. Called from the job monitor's thread, never from the step."""

from __future__ import annotations

import logging
import uuid

from jobs import study_search
from jobs.spec import JobSpec
from jobs.study_spec import StudySpec

log = logging.getLogger(__name__)


class TrialPruning:
    def __init__(self, study_id: uuid.UUID, study: StudySpec, job: JobSpec, trial_number: int) -> None:
        self.optuna_study = study_search.load(study_id, study)
        self.trial_number = trial_number
        # Never before min_epochs, nor while the learning rate is still warming up: a
        # warm-up run looks bad early by design.
        warmup = getattr(job.schedule, "warmup_steps", 0) or 0
        self.first_step = max(study.pruning.min_epochs * job.steps_per_epoch, warmup)
        self.enabled = study.pruning.method != "none"
        self.seen = 0

    def should_prune(self, curve: list[list[float]]) -> bool:
        """Report what is new in `curve` ([step, percent, value] per epoch); True = stop."""
        curve = list(curve)
        if len(curve) == self.seen:
            return False
        self.seen = len(curve)
        points = study_search.schedule_points(curve)
        may_prune = self.enabled and curve[-1][0] >= self.first_step
        return study_search.report_and_check(self.optuna_study, self.trial_number, points, may_prune)

    def report_rest(self, curve: list[list[float]]) -> None:
        """At the trial's end: what the monitor's ticks did not report yet. A trial shorter
        than one tick reported nothing while it ran, and the pruner would then have no
        curve of it to hold later trials against."""
        curve = list(curve)
        if len(curve) == self.seen:
            return
        self.seen = len(curve)
        study_search.report_and_check(self.optuna_study, self.trial_number, study_search.schedule_points(curve), False)
