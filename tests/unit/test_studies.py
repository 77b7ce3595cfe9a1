"""Studies through the API and the domain functions: a bad study is a 422 naming the
field before any trial exists; a grid becomes trial jobs within the parallelism; the
study moves on as trials end (Optuna told), ends with a leaderboard, and is cancelled
with its trials; the statistics and the schedule-fair pruning points."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy import stats

from descent.specfile import load_spec
from jobs import repository, studies, study_search
from jobs.db import session_scope
from jobs.leaderboard import TrialRecord, build_leaderboard
from jobs.models import Job
from jobs.spec import JobSpec
from jobs.states import JobStatus
from jobs.study_spec import StudySpec, sampled_spec
from trainer.recipe import Trainer
from worker.monitor import JobMonitor, JobReporter
from worker.trial_pruning import TrialPruning

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "studies"
BASE = {"dataset": {"name": "iris"}, "epochs": 2, "batch_size": 16}
GRID = {"name": "unit-grid", "base": BASE, "space": {"optimizer.name": {"grid": ["sgd", "adam"]}}, "repeats": 2}


def submit(client: TestClient, body: dict) -> dict:
    response = client.post("/v1/studies", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def refused(client: TestClient, body: dict) -> dict:
    response = client.post("/v1/studies", json=body)
    assert response.status_code == 422, response.text
    return response.json()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"space": {"optimizer.lr": {"log_uniform": [1e-4, 0.1]}}}, "space.optimizer.lr", "grid search needs a grid"),
        ({"space": {"optimizer.lr": {"log_uniform": [0, 0.1]}}, "search": {"method": "random"}},
         "space.optimizer.lr.log_uniform", "0 < low < high"),
        ({"space": {"optimizer.lr": {"between": [0, 1]}}, "search": {"method": "tpe"}}, "space.optimizer.lr",
         "a dimension is one of"),
        ({"space": {"seed": {"grid": [1, 2]}}}, "space.seed", "repeats"),
        ({"space": {"optimizer.name": {"grid": ["sgd", "adam"]}, "optimizer.momentum": {"grid": [0.9]}}},
         "space.optimizer.momentum", 'optimizer.name="adam"'),
        ({"space": {"optimizer.name": {"grid": ["sgd", "lbfgs"]}}}, "space.optimizer.name", "lbfgs"),
        ({"space": {"optimizer.name": {"grid": ["sgd", "adam"]}}, "search": {"method": "grid", "max_trials": 1}},
         "search.max_trials", "the grid has 2 configurations"),
        ({"search": {"method": "grid", "parallelism": 0}}, "search.parallelism", "greater than or equal to 1"),
        ({"search": {"method": "lr_range_test", "min_lr": 1.0, "max_lr": 0.1}}, "search.max_lr", "above min_lr"),
        ({"base": BASE | {"epochs": 0}}, "base.epochs", "greater than or equal to 1"),
        ({"space": {"optimizer.lr": {"grid": [0.1]}}, "base": BASE | {"schedule": {"name": "cosine", "min_lr": 0.5}}},
         "base.schedule.min_lr", "must be below optimizer.lr"),
        ({"space": {"model.hidden": {"grid": [[8], [8]]}}}, "space.model.hidden.grid", "distinct"),
        ({"space": {"dataset.id": {"grid": ["a", "b"]}}}, "space.dataset.id", "one uploaded dataset"),
        ({"search": {"method": "random", "max_trials": 600}, "repeats": 2, "space": {"optimizer.lr": {"uniform": [0.01, 0.1]}}},
         "repeats", "at most 1000 per study"),
    ],
)  # fmt: skip
def test_a_bad_study_is_a_422_naming_the_field(client: TestClient, body: dict, field: str, words: str) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
    problems = refused(client, {"name": "bad", "base": BASE} | body)["detail"]
    assert any(p["field"] == field and words in p["msg"] for p in problems), problems
    assert client.get("/v1/jobs", params={"limit": 100}).json()["items"] == before  # nothing half-written


def test_changing_the_optimizer_keeps_the_fields_both_have() -> None:
    spec = StudySpec.model_validate({"name": "s", "base": BASE | {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}})
    adam = sampled_spec(spec, {"optimizer.name": "adam"}, seed=3)
    assert adam.optimizer.name == "adam" and adam.optimizer.lr == 0.05 and adam.seed == 3
    assert not hasattr(adam.optimizer, "momentum")
    # a path under a field the base left to its default lands in the default member
    lr_only = sampled_spec(StudySpec(name="s", base=BASE), {"optimizer.lr": 0.002}, seed=0)
    assert lr_only.optimizer.name == JobSpec().optimizer.name and lr_only.optimizer.lr == 0.002


def test_trials_with_one_seed_start_from_the_same_weights_and_data_order_whatever_the_optimizer() -> None:
    spec = StudySpec.model_validate(GRID)
    trainers = []
    for optimizer in ("sgd", "adam"):
        trainer = Trainer(sampled_spec(spec, {"optimizer.name": optimizer}, seed=spec.seeds[0]))
        trainer.setup()
        trainers.append(trainer)
    sgd, adam = trainers
    for a, b in zip(sgd.model.state_dict().values(), adam.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(sgd.data.x_train, adam.data.x_train)
    assert torch.equal(torch.randperm(10, generator=sgd.order_generator), torch.randperm(10, generator=adam.order_generator))


# --------------------------------------------------------------------------- the study's life


def finish(job_id: str, status: JobStatus, accuracy: float | None = None, curve: list | None = None) -> None:
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=uuid.UUID(job_id))
    values = {"latest_metrics": {"val_accuracy": accuracy} if accuracy is not None else {}, "objective_curve": curve or []}
    with session_scope() as session:
        assert repository.transition(session=session, job_id=uuid.UUID(job_id), expected=[JobStatus.running], to=status,
                                     values=values)  # fmt: skip


def advance(study_id: str) -> studies.Advance:
    with session_scope() as session:
        return studies.advance_study(session=session, study_id=uuid.UUID(study_id))


def trials(client: TestClient, study_id: str) -> list[dict]:
    return client.get("/v1/jobs", params={"study_id": study_id, "limit": 100}).json()["items"]


def test_a_grid_study_runs_its_trials_within_its_parallelism_and_ends_with_a_leaderboard(client: TestClient) -> None:
    study = submit(client, GRID | {"search": {"method": "grid", "parallelism": 2, "pack_size": 1}})
    first = trials(client, study["id"])
    # two seeds of the first configuration fill the parallelism; the second waits
    assert len(first) == 2 and {t["spec"]["seed"] for t in first} == {0, 1}
    assert {t["spec"]["optimizer"]["name"] for t in first} == {"sgd"}
    assert len({t["study"]["config_id"] for t in first}) == 1

    assert advance(study["id"]).new_jobs == []  # nothing ended: nothing new
    for job, accuracy in zip(first, (0.5, 0.55)):
        finish(job["id"], JobStatus.succeeded, accuracy)
    created = advance(study["id"]).new_jobs
    assert len(created) == 2
    second = [t for t in trials(client, study["id"]) if t["id"] not in {j["id"] for j in first}]
    assert {t["spec"]["optimizer"]["name"] for t in second} == {"adam"}
    for job, accuracy in zip(second, (0.9, 0.92)):
        finish(job["id"], JobStatus.succeeded, accuracy)
    assert advance(study["id"]).ended

    done = client.get(f"/v1/studies/{study['id']}").json()
    assert done["status"] == "succeeded" and done["trials"]["succeeded"] == 4
    best, runner_up = done["leaderboard"]["configurations"]
    assert best["values"] == {"optimizer.name": "adam"} and best["mean"] == pytest.approx(0.91)
    assert runner_up["std"] == pytest.approx(np.std([0.5, 0.55], ddof=1))
    assert done["leaderboard"]["comparison"]["lead_exceeds_noise"] is True
    # Optuna was told every trial
    optuna_study = study_search.load(study["id"], StudySpec.model_validate(done["spec"]))
    assert sorted(t.value for t in optuna_study.trials) == pytest.approx([0.5, 0.55, 0.9, 0.92])


def test_a_study_whose_trials_all_fail_fails(client: TestClient) -> None:
    study = submit(client, GRID | {"repeats": 1, "space": {"optimizer.name": {"grid": ["sgd"]}}})
    [job] = trials(client, study["id"])
    finish(job["id"], JobStatus.failed)
    assert advance(study["id"]).ended
    assert client.get(f"/v1/studies/{study['id']}").json()["status"] == "failed"


def claim(job_id: str) -> repository.Claim:
    with session_scope() as session:
        attempt = repository.claim_job(session=session, job_id=uuid.UUID(job_id))
    assert attempt is not None
    return repository.Claim(uuid.UUID(job_id), attempt)


def mark_trained(*trained: tuple[repository.Claim, float]) -> None:
    with session_scope() as session:
        repository.mark_trained(session=session, trained=[(c, {"val_accuracy": value}) for c, value in trained])


def test_trials_that_have_trained_give_their_places_to_the_next_and_optuna_hears_them_then(client: TestClient) -> None:
    study = submit(client, GRID | {"search": {"method": "grid", "parallelism": 2, "pack_size": 1}})
    first = trials(client, study["id"])
    claims = [claim(job["id"]) for job in first]
    assert advance(study["id"]).new_jobs == []  # both training: no room

    # Their training over, their results still on their way to MLflow: running, but no longer
    # holding the parallelism. The next configuration starts, its sampler told their results.
    mark_trained((claims[0], 0.5), (claims[1], 0.55))
    assert len(advance(study["id"]).new_jobs) == 2
    shown = client.get(f"/v1/jobs/{first[0]['id']}").json()
    assert shown["status"] == "running" and shown["trained_at"] is not None
    assert shown["metrics"]["val_accuracy"] == 0.5
    optuna_study = study_search.load(study["id"], StudySpec.model_validate(study["spec"]))
    assert sorted(t.value for t in optuna_study.trials if t.value is not None) == pytest.approx([0.5, 0.55])

    second = [t for t in trials(client, study["id"]) if t["id"] not in {j["id"] for j in first}]
    mark_trained(*((claim(job["id"]), value) for job, value in zip(second, (0.9, 0.92))))
    assert not advance(study["id"]).ended  # every trial trained, none ended: the study runs on
    for job in first + second:
        with session_scope() as session:
            assert repository.transition(session=session, job_id=uuid.UUID(job["id"]), expected=[JobStatus.running],
                                         to=JobStatus.succeeded)  # fmt: skip
    assert advance(study["id"]).ended
    optuna_study = study_search.load(study["id"], StudySpec.model_validate(study["spec"]))
    assert sorted(t.value for t in optuna_study.trials) == pytest.approx([0.5, 0.55, 0.9, 0.92])  # each told once
    assert client.get(f"/v1/studies/{study['id']}").json()["trials"]["succeeded"] == 4


def test_a_trained_trial_whose_worker_died_holds_its_place_again(client: TestClient) -> None:
    study = submit(client, GRID | {"search": {"method": "grid", "parallelism": 2, "pack_size": 1}})
    first = trials(client, study["id"])
    claims = [claim(job["id"]) for job in first]
    mark_trained(*((c, 0.5) for c in claims))
    lost = uuid.UUID(first[0]["id"])
    with session_scope() as session:  # its lease ran out: the reaper requeues it
        session.get(Job, lost).lease_until = datetime(2000, 1, 1, tzinfo=timezone.utc)
    with session_scope() as session:
        assert [r.status for r in repository.reap_lost_jobs(session=session)] == [JobStatus.queued]
    with session_scope() as session:
        requeued = session.get(Job, lost)
        assert requeued.trained_at is None and studies.holds_a_place(requeued)
        assert not studies.holds_a_place(session.get(Job, claims[1].job_id))
    again = claim(first[0]["id"])
    assert again.attempt == 2
    with session_scope() as session:  # an earlier attempt's mark does not count for this one
        repository.mark_trained(session=session, trained=[(claims[0], {"val_accuracy": 0.1})])
        assert studies.holds_a_place(session.get(Job, lost))


def test_cancelling_a_study_cancels_its_trials_and_ends_it(client: TestClient) -> None:
    study = submit(client, GRID)
    response = client.post(f"/v1/studies/{study['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert {t["status"] for t in trials(client, study["id"])} == {"cancelled"}
    assert advance(study["id"]).new_jobs == []  # an ended study never starts another trial
    assert client.post(f"/v1/studies/{study['id']}/cancel").status_code == 409
    assert client.get(f"/v1/studies/{uuid.uuid4()}").status_code == 404


def test_random_and_tpe_draw_inside_the_space_and_repeat_each_configuration_over_seeds(client: TestClient) -> None:
    for method in ("random", "tpe"):
        body = {"name": f"unit-{method}", "base": BASE, "repeats": 2,
                "space": {"optimizer.lr": {"log_uniform": [1e-4, 1e-1]}, "model.hidden": {"grid": [[8], [16, 8]]}},
                "search": {"method": method, "max_trials": 3, "parallelism": 4, "pack_size": 1}}  # fmt: skip
        study = submit(client, body)
        jobs = trials(client, study["id"])
        assert len(jobs) == 4  # two configurations of two seeds fill the parallelism
        by_config: dict[str, list[dict]] = {}
        for job in jobs:
            by_config.setdefault(job["study"]["config_id"], []).append(job)
        for same in by_config.values():
            assert len({j["spec"]["optimizer"]["lr"] for j in same}) == 1 and len({j["spec"]["seed"] for j in same}) == 2
            assert 1e-4 <= same[0]["spec"]["optimizer"]["lr"] <= 1e-1
            assert same[0]["spec"]["model"]["hidden"] in ([8], [16, 8])


def test_the_range_test_is_one_job_whose_lr_ramps_over_the_steps(client: TestClient) -> None:
    study = submit(client, {"name": "unit-lr", "base": BASE, "search": {"method": "lr_range_test", "min_lr": 1e-5,
                                                                        "max_lr": 1.0, "steps": 40}})  # fmt: skip
    [job] = trials(client, study["id"])
    spec = JobSpec.model_validate(job["spec"])
    assert spec.schedule.name == "lr_range" and spec.schedule.min_lr == 1e-5 and spec.optimizer.lr == 1.0
    assert spec.total_steps >= 40 and spec.log_every_steps == 1


# --------------------------------------------------------------------------- statistics


def records(values: dict[str, list[float]]) -> list[TrialRecord]:
    return [TrialRecord(f"{name}-{i}", name, {"optimizer.name": name}, i, "succeeded", v)
            for name, vs in values.items() for i, v in enumerate(vs)]  # fmt: skip


def test_the_lead_is_tested_with_welch_and_a_bootstrap_interval() -> None:
    spec = StudySpec.model_validate(GRID)
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.89, 0.94, 0.88]
    board = build_leaderboard(spec, records({"adam": a, "sgd": b}))
    comparison = board["comparison"]
    assert comparison["p_value"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    low, high = comparison["ci95"]
    assert low <= np.mean(a) - np.mean(b) <= high
    assert comparison["lead_exceeds_noise"] is False  # overlapping seeds: not a real lead

    clear = build_leaderboard(spec, records({"adam": [0.95, 0.96, 0.955], "sgd": [0.60, 0.62, 0.61]}))["comparison"]
    assert clear["lead_exceeds_noise"] is True and clear["p_value"] < 0.001


def test_a_loss_objective_ranks_lowest_first_and_one_seed_cannot_be_tested() -> None:
    spec = StudySpec.model_validate(GRID | {"objective": {"metric": "val_loss"}, "repeats": 1})
    board = build_leaderboard(spec, records({"adam": [0.3], "sgd": [0.2]}))
    assert [r["config_id"] for r in board["configurations"]] == ["sgd", "adam"]
    assert board["comparison"]["p_value"] is None and "repeats >= 2" in board["comparison"]["reason"]


def test_steps_to_target_is_the_first_epoch_that_reached_it() -> None:
    spec = StudySpec.model_validate(GRID | {"objective": {"target": 0.8}})
    curve = [[10, 50.0, 0.6], [20, 100.0, 0.85]]
    trial = TrialRecord("j", "c", {}, 0, "succeeded", 0.85, curve)
    [row] = build_leaderboard(spec, [trial])["configurations"]
    assert row["steps_to_target"] == 20 and row["reached_target"] == "1/1"


# --------------------------------------------------------------------------- pruning fair to schedules


def test_trials_report_at_tenths_of_their_own_schedule() -> None:
    # 3 epochs: measured at 33 %, 67 %, 100 %; a tenth gets the value last measured before it
    curve = [[5, 33.3, 0.4], [10, 66.7, 0.6], [15, 100.0, 0.7]]
    assert study_search.schedule_points(curve[:1]) == {}  # nothing at 10-30 % was measured yet
    assert study_search.schedule_points(curve[:2]) == {40: 0.4, 50: 0.4, 60: 0.4}
    assert study_search.schedule_points(curve) == {40: 0.4, 50: 0.4, 60: 0.4, 70: 0.6, 80: 0.6, 90: 0.6, 100: 0.7}
    # 2 epochs of another trial land on the same points: they are compared at 50 % and 100 %
    assert study_search.schedule_points([[8, 50.0, 0.5], [16, 100.0, 0.8]]) == {
        50: 0.5, 60: 0.5, 70: 0.5, 80: 0.5, 90: 0.5, 100: 0.8}  # fmt: skip


def test_no_trial_is_pruned_before_min_epochs_or_during_its_warm_up(client: TestClient) -> None:
    body = GRID | {"name": "unit-prune", "repeats": 1, "pruning": {"method": "median", "min_epochs": 2},
                   "base": BASE | {"epochs": 6}}  # fmt: skip
    study = submit(client, body)
    spec = StudySpec.model_validate(study["spec"])
    with session_scope() as session:
        job = session.query(Job).filter(Job.study_id == uuid.UUID(study["id"])).first()
        job_spec, number = JobSpec.model_validate(job.spec), job.trial_number
    pruning = TrialPruning(uuid.UUID(study["id"]), spec, job_spec, number)
    assert pruning.first_step == 2 * job_spec.steps_per_epoch
    warm = job_spec.model_copy(update={"schedule": JobSpec.model_validate(
        BASE | {"epochs": 6, "schedule": {"name": "warmup_cosine", "warmup_steps": 30}}).schedule})  # fmt: skip
    assert TrialPruning(uuid.UUID(study["id"]), spec, warm, number).first_step == max(30, 2 * job_spec.steps_per_epoch)
    # before first_step the pruner is not even asked, however bad the value
    assert pruning.should_prune([[job_spec.steps_per_epoch, 16.7, 0.0]]) is False


def test_a_trial_shorter_than_a_monitor_tick_still_gives_the_pruner_its_whole_curve(client: TestClient) -> None:
    body = GRID | {"name": "unit-short-curve", "repeats": 1, "pruning": {"method": "median"}}
    study = submit(client, body)
    spec = StudySpec.model_validate(study["spec"])
    with session_scope() as session:
        job = session.query(Job).filter(Job.study_id == uuid.UUID(study["id"])).first()
        job_id, job_spec, number = job.id, JobSpec.model_validate(job.spec), job.trial_number
    reporter = JobReporter(None)
    monitor = JobMonitor(job_id, reporter, interval_s=3600)  # never ticks while the trial runs
    monitor.pruning = TrialPruning(uuid.UUID(study["id"]), spec, job_spec, number)
    with monitor:
        reporter.objective, reporter.total_steps = "val_accuracy", 10
        reporter.log_metrics(5, {"epoch": 1, "val_accuracy": 0.4})
        reporter.log_metrics(10, {"epoch": 2, "val_accuracy": 0.6})
    optuna_trial = next(t for t in study_search.load(study["id"], spec).trials if t.number == number)
    assert optuna_trial.intermediate_values == study_search.schedule_points(reporter.objective_curve)
    assert optuna_trial.intermediate_values[100] == 0.6


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_study_is_accepted(client: TestClient, path: Path) -> None:
    study = submit(client, load_spec(path))
    client.post(f"/v1/studies/{study['id']}/cancel")  # only its validation is under test here


def test_telling_optuna_twice_is_harmless(client: TestClient) -> None:
    study = submit(client, GRID | {"name": "unit-tell", "repeats": 1})
    optuna_study = study_search.load(study["id"], StudySpec.model_validate(study["spec"]))
    number = optuna_study.trials[0].number
    study_search.tell(optuna_study, number, 0.7, pruned=False)
    study_search.tell(optuna_study, number, 0.7, pruned=False)  # a retried advance
    assert optuna_study.trials[0].value == 0.7


def test_each_advance_draws_a_new_configuration(client: TestClient) -> None:
    body = {"name": "unit-draws", "base": BASE, "space": {"optimizer.lr": {"log_uniform": [1e-4, 1e-1]}},
            "search": {"method": "random", "max_trials": 4, "parallelism": 1, "pack_size": 1}}  # fmt: skip
    study = submit(client, body)
    for _ in range(3):  # one trial at a time: every configuration comes from its own advance
        [running] = [t for t in trials(client, study["id"]) if t["status"] == "queued"]
        finish(running["id"], JobStatus.succeeded, 0.5)
        advance(study["id"])
    lrs = {t["spec"]["optimizer"]["lr"] for t in trials(client, study["id"])}
    assert len(lrs) == 4


def test_a_study_on_an_uploaded_dataset_fills_in_its_metadata(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    rows = "\n".join(f"{a:.3f},{b:.3f},{'yes' if a + b > 0 else 'no'}" for a, b in rng.normal(size=(60, 2)))
    response = client.post("/v1/datasets", files={"file": ("xy.csv", f"a,b,label\n{rows}\n".encode())},
                           data={"label": "label", "name": "xy"})  # fmt: skip
    assert response.status_code in (200, 201), response.text
    dataset = response.json()
    study = submit(client, GRID | {"name": "unit-upload", "base": BASE | {"dataset": {"id": dataset["id"]}}})
    [job, *_] = trials(client, study["id"])
    assert job["spec"]["dataset"]["sha256"] == dataset["sha256"] and job["spec"]["dataset"]["n_classes"] == 2
    unknown = refused(client, GRID | {"base": BASE | {"dataset": {"id": str(uuid.uuid4())}}})
    assert unknown["detail"][0]["field"] == "base.dataset.id"


def test_a_grid_of_objects_shows_each_as_the_space_wrote_it(client: TestClient) -> None:
    choices = [{"name": "sgd", "lr": 0.1}, {"name": "sgd", "lr": 0.02, "momentum": 0.9}]
    study = submit(client, {"name": "unit-objects", "base": BASE, "space": {"optimizer": {"grid": choices}}})
    rows = client.get(f"/v1/studies/{study['id']}").json()["leaderboard"]["configurations"]
    assert [r["values"]["optimizer"] for r in rows] == choices


def test_a_packable_study_keeps_its_parallelism_in_trials_and_refuses_a_bad_pack_size(client: TestClient) -> None:
    # Packing changes how the queued trials are trained, not how many are queued: a
    # study's limits and its sampler's pace keep counting trials.
    packable = GRID | {"name": "unit-packs", "repeats": 3, "search": {"method": "grid", "parallelism": 3, "pack_size": 6}}
    study = submit(client, packable)
    assert len(trials(client, study["id"])) == 3  # one configuration's three seeds (whole configurations only)
    wide = packable | {"name": "unit-packs-wide", "search": {"method": "grid", "parallelism": 6, "pack_size": 6}}
    assert len(trials(client, submit(client, wide)["id"])) == 6
    response = client.post("/v1/studies", json=packable | {"search": {"method": "tpe", "pack_size": 65}})
    assert response.status_code == 422
    assert any(p["field"] == "search.pack_size" for p in response.json()["detail"]), response.text
