"""A study's side of the worker: its MLflow parent run (the trials' runs nest under it),
moving the study on when trials have trained and when they end, and its final report.

The report (written once the study ended, by the worker that ran its last trial or
else by the reaper) puts on the parent run: the leaderboard as a table, the plots
people would otherwise make by hand, the range test's reading, and registers the
best trial's model as `<project>.<study>`. MLflow down: the study has ended all the
same (the leaderboard is in PostgreSQL) and the report waits for a later pass.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_USER
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import studies
from jobs.access import key_name
from jobs.db import session_scope
from jobs.lr_range import analyse
from jobs.mlflow_tenancy import project_experiment_id, project_registered_model, registered_model_name
from jobs.models import Job, Study, utcnow
from jobs.repository import Claim, mark_trained
from jobs.settings import settings
from jobs.states import JobStatus, StudyStatus
from jobs.study_spec import LRRangeTest, StudySpec, describe_values
from jobs.tracking import metric_history, run_user, source_run_tags, tracking_client
from worker import study_plots

log = logging.getLogger(__name__)

REPORT_ATTEMPTS = 5  # a report that fails this often (not an outage: a bug) is given up
RUN_STATUS_OF_STUDY = {StudyStatus.succeeded: RunStatus.FINISHED, StudyStatus.failed: RunStatus.FAILED,
                       StudyStatus.cancelled: RunStatus.KILLED}  # fmt: skip


def ensure_parent_run(client: MlflowClient, study_id: uuid.UUID) -> str:
    """The study's parent run, created by the first trial that needs it (the row lock
    makes concurrent first trials agree on one). Once made it never changes: later trials
    read it without the lock, which a trial ending in the same study (moving it on) holds
    for tens of milliseconds while this trial's run waits to open."""
    with session_scope() as session:
        known = session.scalar(select(Study.mlflow_run_id).where(Study.id == study_id))
    if known:
        return known
    with session_scope() as session:
        study = studies.lock_study(session, study_id)
        assert study is not None
        return _parent_run(client, session, study)


def _parent_run(client: MlflowClient, session: Session, study: Study) -> str:
    """The study's parent run, made if it has none; the caller holds the study's row lock."""
    if study.mlflow_run_id:
        return study.mlflow_run_id
    spec = studies.parse_study(study)
    experiment = spec.base.get("experiment") or settings.default_experiment
    experiment_id = project_experiment_id(client, session, study.project, experiment)
    tags = {"descent.study_id": str(study.id), "descent.kind": "study", "descent.project": study.project,
            MLFLOW_USER: run_user(study.project, key_name(session=session, key_id=study.submitted_by_key_id))}
    tags |= source_run_tags()  # in the same request: who submitted the study and what made its run
    run = client.create_run(experiment_id, run_name=f"study {spec.name}", tags=tags)
    params = {
        "search.method": spec.search.method, "repeats": str(spec.repeats),
        "objective.metric": spec.objective.metric, "objective.direction": spec.objective.direction,
        "pruning.method": spec.pruning.method, "space": json.dumps(spec.model_dump(mode="json", by_alias=True)["space"]),
    }  # fmt: skip
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    studies.set_parent_run(session=session, study_id=study.id, experiment_id=experiment_id, run_id=run.info.run_id)
    return run.info.run_id


class TrialRun(NamedTuple):
    """What the report needs of one trial (read once, before MLflow is called)."""

    job_id: uuid.UUID
    status: str
    run_id: str | None
    config_id: str | None
    spec: dict[str, Any]
    objective: float | None


def trial_tags(job: Job, parent_run_id: str) -> dict[str, str]:
    tags = {
        "mlflow.parentRunId": parent_run_id,  # nests the trial's run under the study's in the UI
        "descent.study_id": str(job.study_id),
        "descent.config_id": job.config_id or "",
        "descent.seed": str(job.spec.get("seed", 0)),
        "descent.trial_number": str(job.trial_number),
    }
    if job.pack_id is not None:  # trained packed: runs with the same tag trained together
        tags["descent.pack"] = str(job.pack_id)
    return tags


def advance(study_id: uuid.UUID, report: bool = True) -> None:
    """Move the study on (a trial of it ended); write its report when it ended (unless
    `report` is False: the reaper writes due reports in a pass of its own)."""
    step = studies.move_on(study_id)
    if step.ended and report:
        write_report(study_id)


def trained(study_id: uuid.UUID, trials: list[tuple[Claim, dict[str, float | None]]]) -> None:
    """These trials of the study (their attempts, with their final metrics) finished training
    and now write their results to MLflow: they give back their places of the study's
    parallelism (jobs/studies.py: holds_a_place), Optuna is told their results, and the study
    moves on at once. Its next trials train while these upload (about half of a short
    trial's time, mostly the MLflow server's), instead of each round of the study waiting
    for the last one's uploads.

    Called before the trials' ends start, not beside them: beside them (threads of the same
    process) it waited on their work for the interpreter, ~150 ms instead of ~40."""
    try:
        with session_scope() as session:
            mark_trained(session=session, trained=trials)
        advance(study_id, report=False)  # (these trials are running: the study cannot end here)
    except Exception:  # noqa: BLE001 - the trials end all the same, and their ends move the study on
        log.exception("study %s: its trials trained, but it could not be moved on before they ended", study_id)


# --------------------------------------------------------------------------- the report


def short_label(values: dict[str, Any]) -> str:
    """A legend's label: floats to 3 significant digits, the common path prefix kept."""
    parts = [f"{path}={value:.3g}" if isinstance(value, float) else f"{path}={json.dumps(value)}"
             for path, value in values.items()]  # fmt: skip
    return ", ".join(parts) or "base spec"


def _log_figure(client: MlflowClient, run_id: str, fig: plt.Figure, name: str) -> None:
    try:
        client.log_figure(run_id, fig, name)
    finally:
        plt.close(fig)


def _leaderboard_csv(board: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "config_id", "values", "n", "mean", "std", "steps_to_target", "statuses"])
    for row in board["configurations"]:
        writer.writerow([row["rank"], row["config_id"], describe_values(row["values"]), row["n"], row["mean"],
                         row["std"], row["steps_to_target"], json.dumps(row["statuses"])])  # fmt: skip
    return out.getvalue()


def _leaderboard_columns(board: dict[str, Any]) -> dict[str, list[Any]]:
    rows = board["configurations"]
    return {
        "rank": [r["rank"] for r in rows],
        "configuration": [describe_values(r["values"]) for r in rows],
        "seeds": [r["n"] for r in rows],
        f"{board['metric']}_mean": [r["mean"] for r in rows],
        f"{board['metric']}_std": [r["std"] for r in rows],
        "steps_to_target": [r["steps_to_target"] for r in rows],
    }


def write_report(study_id: uuid.UUID) -> bool:
    """The ended study's MLflow report; False when it must be tried again later. One writer
    at a time: the study's row stays locked while the report is written (the worker that
    ended the study and a reaper pass would otherwise both register a model version)."""
    client = tracking_client()
    with session_scope() as session:
        study = studies.claim_report(session=session, study_id=study_id)
        if study is None:  # written already, or being written by another process
            return True
        spec = studies.parse_study(study)
        metric = spec.objective.metric
        trials = [
            TrialRun(j.id, j.status, j.mlflow_run_id, j.config_id, j.spec,
                     (j.latest_metrics or {}).get(metric) if j.status == JobStatus.succeeded else None)
            for j in studies.trial_jobs(session=session, study_id=study_id)
        ]  # fmt: skip
        board = studies.leaderboard(session=session, study=study)
        packs = studies.packs(session=session, study_id=study_id)
        attempts = int((study.result or {}).get("report_attempts", 0)) + 1
        try:
            parent = _parent_run(client, session, study)
            report = _report(client, session, study.project, parent, spec, board, trials)
            if packs:  # which trials trained together (their runs carry the tag descent.pack)
                client.log_dict(parent, {"packs": packs}, "packs.json")
                report["packs"] = packs
            client.set_terminated(parent, status=RunStatus.to_string(RUN_STATUS_OF_STUDY[StudyStatus(study.status)]))
        except Exception as exc:  # noqa: BLE001 - MLflow down (or a bug): the reaper tries again
            log.warning("study %s: report not written (attempt %d): %s", study_id, attempts, exc)
            study.result = dict(study.result or {}) | {"report_attempts": attempts,
                                                       "report_error": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
            study.report_pending = attempts < REPORT_ATTEMPTS
            return False
        studies.record_report(session=session, study_id=study_id, report=report | {"leaderboard": board,
                                                                                    "reported_at": utcnow().isoformat()})  # fmt: skip
    log.info("study %s: report written to MLflow run %s", study_id, parent)
    return True


def _report(
    client: MlflowClient, session: Session, project: str, parent: str, spec: StudySpec, board: dict[str, Any],
    trials: list[TrialRun],
) -> dict[str, Any]:
    client.log_dict(parent, board, "leaderboard.json")
    client.log_text(parent, _leaderboard_csv(board), "leaderboard.csv")
    client.log_table(parent, data=_leaderboard_columns(board), artifact_file="leaderboard_table.json")  # a UI table
    labels = {row["config_id"]: short_label(row["values"]) for row in board["configurations"]}
    ran = [t for t in trials if t.run_id and t.status in (JobStatus.succeeded, JobStatus.pruned)]
    histories: dict[uuid.UUID, dict[str, list[tuple[int, float]]]] = {
        t.job_id: {key: metric_history(client, t.run_id, key) for key in ("train_loss", "val_accuracy", "lr")}  # type: ignore[arg-type]
        for t in ran
    }
    report: dict[str, Any] = {}
    for metric in ("train_loss", "val_accuracy"):
        groups: dict[str, list] = {}
        for t in ran:
            groups.setdefault(labels.get(t.config_id, t.config_id), []).append(histories[t.job_id][metric])
        figure = study_plots.curves_figure(metric, groups, log_y=metric.endswith("loss"))  # spikes stay readable
        _log_figure(client, parent, figure, f"plots/{metric}.png")
    metric = spec.objective.metric
    by_optimizer: dict[str, list[tuple[float, float]]] = {}
    for t in trials:
        if t.objective is not None:
            by_optimizer.setdefault(t.spec["optimizer"]["name"], []).append((t.spec["optimizer"]["lr"], t.objective))
    _log_figure(client, parent, study_plots.objective_vs_lr_figure(metric, by_optimizer), "plots/objective_vs_lr.png")
    schedules = {}
    for t in ran:
        schedules.setdefault(labels.get(t.config_id, t.config_id), histories[t.job_id]["lr"])
    _log_figure(client, parent, study_plots.schedules_figure(schedules), "plots/lr_schedules.png")

    metrics = []
    best = next((row for row in board["configurations"] if row["rank"] == 1), None)
    now = int(utcnow().timestamp() * 1000)
    if best is not None:
        metrics.append(Metric(f"best_{metric}_mean", best["mean"], now, 0))
    comparison = board.get("comparison") or {}
    if comparison.get("p_value") is not None:
        metrics.append(Metric("lead_p_value", comparison["p_value"], now, 0))
    if metrics:
        client.log_batch(parent, metrics=metrics)
    if best is not None:
        client.set_tag(parent, "descent.best_config", labels.get(best["config_id"], best["config_id"]))

    if isinstance(spec.search, LRRangeTest) and ran:
        lrs = [v for _, v in histories[ran[0].job_id]["lr"]]
        losses = [v for _, v in histories[ran[0].job_id]["train_loss"]]
        steps = [s for s, _ in histories[ran[0].job_id]["lr"]]
        # The trainer's own record of the exploding step (it watched every step, finite or not).
        exploded = metric_history(client, ran[0].run_id, "exploded_at_lr")  # type: ignore[arg-type]
        reading = analyse(lrs, losses, spec.search.stop_factor, steps, exploded[-1] if exploded else None)
        report["lr_range_test"] = reading
        client.log_dict(parent, reading, "lr_range_test.json")
        _log_figure(client, parent, study_plots.range_test_figure(lrs, losses, reading["suggested_lr"]),
                    "plots/lr_range_test.png")  # fmt: skip
        if reading["suggested_lr"]:
            client.log_batch(parent, metrics=[Metric("suggested_lr", reading["suggested_lr"], now, 0)])
    if best is not None and best.get("best_job_id") and not isinstance(spec.search, LRRangeTest):
        report["registered_model"] = _register_best(client, session, project, trials, best["best_job_id"], spec.name)
    return report


def _register_best(
    client: MlflowClient, session: Session, project: str, trials: list[TrialRun], job_id: str, study_name: str
) -> dict[str, Any] | None:
    """The best trial's model in the Model Registry as `<project>.<study>` (a new version
    each time a study of that name ends in the project)."""
    run_id = next((t.run_id for t in trials if str(t.job_id) == job_id), None)
    if run_id is None or not settings.log_model:
        return None
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    name = registered_model_name(project, study_name)
    try:
        project_registered_model(client, session, project, study_name)
        version = mlflow.register_model(f"runs:/{run_id}/model", name, await_registration_for=60)
    except MlflowException as exc:
        log.warning("could not register the best model of study %s: %s", name, exc)
        return {"name": name, "version": None, "error": str(exc)[:300]}
    client.set_registered_model_alias(name, "best", version.version)
    return {"name": name, "version": version.version, "run_id": run_id, "job_id": job_id, "alias": "best"}
