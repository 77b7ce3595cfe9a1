"""The recovery rules on the job rows (SQLite here; PostgreSQL in tests/integration):
who may write a job, what the reaper makes of a lost one, how many lost messages
are sent again."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta

import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import delete, update

from jobs import repository
from jobs.db import session_scope
from jobs.models import Job, JobEvent, Study, utcnow
from jobs.spec import JobSpec
from jobs.states import JobStatus

SMALL = {"dataset": {"name": "iris"}, "epochs": 2}


def new_job(**spec) -> uuid.UUID:  # noqa: ANN003
    with session_scope() as session:
        job, _ = repository.create_job(session=session, spec=JobSpec.model_validate(SMALL | spec))
        return job.id


def claim(job_id: uuid.UUID, lease_s: float = 30) -> int:
    with session_scope() as session:
        attempt = repository.claim_job(session=session, job_id=job_id, worker="host:1", lease_s=lease_s)
    assert attempt is not None
    return attempt


def expire_lease(job_id: uuid.UUID) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


def reap() -> dict[uuid.UUID, JobStatus]:
    with session_scope() as session:
        return {r.job_id: r.status for r in repository.reap_lost_jobs(session=session)}


def row(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        return repository.get_job(session=session, job_id=job_id)


@pytest.fixture(autouse=True)
def only_these_jobs(migrated_db: str) -> None:
    with session_scope() as session:  # each test sees only its own jobs
        session.execute(delete(JobEvent))
        session.execute(delete(Job))
        session.execute(delete(Study))


def test_a_live_lease_is_left_alone_and_a_lost_one_requeued() -> None:
    job_id = new_job()
    claim(job_id)
    assert reap() == {}
    expire_lease(job_id)
    assert reap() == {job_id: JobStatus.queued}
    job = row(job_id)
    assert (job.status, job.attempts, job.lease_until, job.worker) == ("queued", 1, None, None)
    assert claim(job_id) == 2  # the next attempt


def test_out_of_attempts_fails_with_worker_lost() -> None:
    job_id = new_job(max_attempts=2)
    for attempt in (1, 2):
        assert claim(job_id) == attempt
        expire_lease(job_id)
        outcome = reap()
    assert outcome == {job_id: JobStatus.failed}
    job = row(job_id)
    assert job.error_type == "WorkerLost" and "no attempts left" in job.error_message
    assert job.finished_at is not None


def test_a_lost_job_being_cancelled_ends_cancelled() -> None:
    job_id = new_job()
    claim(job_id)
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=job_id)
    expire_lease(job_id)
    assert reap() == {job_id: JobStatus.cancelled}


def test_a_stale_attempt_can_no_longer_write() -> None:
    job_id = new_job()
    first = claim(job_id)
    expire_lease(job_id)
    reap()
    second = claim(job_id)
    with session_scope() as session:
        # The first attempt's worker wakes up: its progress, checkpoint and ending are refused.
        assert repository.record_progress(session=session, job_id=job_id, epoch=1, step=5, metrics={},
                                          attempt=first) is None  # fmt: skip
        assert not repository.save_checkpoint(session=session, job_id=job_id, attempt=first, step=5, epoch=1,
                                              data=b"x")  # fmt: skip
        assert repository.transition(session=session, job_id=job_id, expected=[JobStatus.running],
                                     to=JobStatus.succeeded, attempt=first) is None  # fmt: skip
        # The current attempt's are taken.
        assert repository.record_progress(session=session, job_id=job_id, epoch=1, step=5, metrics={},
                                          attempt=second) == JobStatus.running  # fmt: skip
        assert repository.save_checkpoint(session=session, job_id=job_id, attempt=second, step=5, epoch=1,
                                          data=b"y")  # fmt: skip
    with session_scope() as session:
        assert repository.load_checkpoint(session=session, job_id=job_id).data == b"y"


def test_only_as_many_unclaimed_jobs_as_were_lost_are_sent_again() -> None:
    ids = [new_job() for _ in range(5)]
    with session_scope() as session:
        session.execute(update(Job).values(enqueued_at=utcnow() - timedelta(minutes=5)))
    with session_scope() as session:
        assert repository.count_queued(session=session) == 5
        again = repository.claim_unclaimed(session=session, older_than_s=60, limit=2)
    assert again == ids[:2]  # the oldest first, no more than were lost
    with session_scope() as session:
        # Just sent: not again until they have waited once more.
        assert repository.claim_unclaimed(session=session, older_than_s=60, limit=5) == ids[2:]
        assert repository.claim_unclaimed(session=session, older_than_s=60, limit=5) == []
        assert repository.claim_unclaimed(session=session, older_than_s=60, limit=0) == []


# --------------------------------------------------------------------------- MLflow runs end with their jobs


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """A real MLflow tracking store (SQLite-backed), no server needed."""
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


def job_with_run(client: MlflowClient, **spec) -> tuple[uuid.UUID, str]:  # noqa: ANN003
    job_id = new_job(**spec)
    claim(job_id)
    experiment = client.get_experiment_by_name("unit") or client.get_experiment(client.create_experiment("unit"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    with session_scope() as session:
        repository.set_mlflow_run(session=session, job_id=job_id, experiment_id=experiment.experiment_id,
                                  run_id=run_id)  # fmt: skip
    return job_id, run_id


def test_the_reaper_ends_the_run_of_a_job_it_fails_before_the_job_reads_failed(
    mlflow_store: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import reaper

    job_id, run_id = job_with_run(mlflow_store, max_attempts=1)
    experiment_id = mlflow_store.get_run(run_id).info.experiment_id
    # the model record the worker made while the job trained, before it died
    draft = mlflow_store.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    expire_lease(job_id)
    seen_when_run_ended = []
    real_end_run = reaper.end_run

    def end_run(client: MlflowClient, run: str, status: JobStatus) -> None:
        with session_scope() as other:  # another reader, while the reaper's transaction is open
            seen_when_run_ended.append(repository.get_job(session=other, job_id=job_id).status)
        real_end_run(client, run, status)

    monkeypatch.setattr(reaper, "tracking_client", lambda: mlflow_store)
    monkeypatch.setattr(reaper, "end_run", end_run)
    reaper.recover_once()
    assert row(job_id).status == "failed" and not row(job_id).mlflow_run_to_end
    assert mlflow_store.get_run(run_id).info.status == "FAILED"
    assert seen_when_run_ended == ["running"]  # nobody saw the job failed with its run still RUNNING
    listed = mlflow_store.search_logged_models(experiment_ids=[experiment_id])
    assert draft.model_id not in {m.model_id for m in listed}  # a record of no model: deleted


def test_a_run_mlflow_could_not_end_is_ended_by_a_later_pass(
    mlflow_store: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import reaper

    job_id, run_id = job_with_run(mlflow_store)
    with session_scope() as session:  # the worker ends the job while MLflow is down: it says so
        repository.transition(session=session, job_id=job_id, expected=[JobStatus.running], to=JobStatus.succeeded)
    assert row(job_id).mlflow_run_to_end

    def mlflow_down() -> MlflowClient:
        raise ConnectionError("MLflow is down")

    monkeypatch.setattr(reaper, "tracking_client", mlflow_down)
    reaper.recover_once()
    assert row(job_id).mlflow_run_to_end and mlflow_store.get_run(run_id).info.status == "RUNNING"
    monkeypatch.setattr(reaper, "tracking_client", lambda: mlflow_store)
    reaper.recover_once()
    assert not row(job_id).mlflow_run_to_end and mlflow_store.get_run(run_id).info.status == "FINISHED"


def test_a_job_cancelled_while_queued_has_its_earlier_attempts_run_killed(
    mlflow_store: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import reaper

    job_id, run_id = job_with_run(mlflow_store)
    expire_lease(job_id)
    monkeypatch.setattr(reaper, "tracking_client", lambda: mlflow_store)
    reaper.recover_once()  # requeued for a second attempt: the run stays open for it
    assert row(job_id).status == "queued" and mlflow_store.get_run(run_id).info.status == "RUNNING"
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=job_id)
    reaper.recover_once()
    assert row(job_id).status == "cancelled" and mlflow_store.get_run(run_id).info.status == "KILLED"


def test_a_job_without_a_run_has_nothing_to_end() -> None:
    job_id = new_job()
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=job_id)
    assert not row(job_id).mlflow_run_to_end


def test_a_worker_that_ended_its_own_job_is_told_so_not_that_it_lost_it() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    with session_scope() as session:
        repository.transition(session=session, job_id=job_id, expected=[JobStatus.running], to=JobStatus.succeeded,
                              attempt=attempt)  # fmt: skip
    with session_scope() as session:  # the monitor's last heartbeat, racing the end
        assert repository.record_progress(session=session, job_id=job_id, epoch=1, step=5, metrics={},
                                          attempt=attempt) == JobStatus.succeeded  # fmt: skip
        assert repository.record_progress(session=session, job_id=job_id, epoch=1, step=5, metrics={},
                                          attempt=attempt + 1) is None  # fmt: skip


def test_only_a_connection_failure_counts_as_mlflow_unreachable(
    mlflow_store: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused is refused: no need to ask 3 times
    from worker.execute import mlflow_unreachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(Exception) as refused:
        down.get_experiment("0")
    assert mlflow_unreachable(refused.value)
    with pytest.raises(MlflowException) as missing:
        mlflow_store.get_run("0" * 32)  # MLflow answered: no such run; waiting would not help
    assert not mlflow_unreachable(missing.value)


def test_an_attempt_killed_between_creating_its_run_and_recording_it_leaves_no_orphan(
    mlflow_store: MlflowClient,
) -> None:
    """The first attempt's run was created in MLflow, then the worker died before the job
    row named it: the next attempt finds the run by its descent.job_id tag and continues it."""
    from worker.mlflow_run import open_run

    job_id = new_job(name="killed-at-open", experiment="unit-orphans")
    claim(job_id)
    spec = JobSpec.model_validate(row(job_id).spec)
    orphan = open_run(mlflow_store, spec, job_id, attempt=1)  # ... and killed here: nothing on the job
    expire_lease(job_id)
    reap()
    attempt = claim(job_id)
    assert attempt == 2 and row(job_id).mlflow_run_id is None

    run_id, steps = run_connector_of(mlflow_store, job_id, spec, attempt)
    assert run_id == orphan.run_id and steps == {}
    assert (row(job_id).mlflow_experiment_id, row(job_id).mlflow_run_id) == (orphan.experiment_id, orphan.run_id)
    runs = mlflow_store.search_runs([orphan.experiment_id], filter_string=f"tags.`descent.job_id` = '{job_id}'")
    assert [r.info.run_id for r in runs] == [orphan.run_id]
    assert runs[0].data.tags["descent.attempt"] == "2"


def test_a_later_attempt_of_a_job_that_never_opened_a_run_opens_one(mlflow_store: MlflowClient) -> None:
    job_id = new_job(name="never-opened", experiment="unit-orphans")
    claim(job_id)
    expire_lease(job_id)
    reap()
    attempt = claim(job_id)
    spec = JobSpec.model_validate(row(job_id).spec)
    run_id, _ = run_connector_of(mlflow_store, job_id, spec, attempt)
    assert row(job_id).mlflow_run_id == run_id


def run_connector_of(client: MlflowClient, job_id: uuid.UUID, spec: JobSpec, attempt: int) -> tuple[str, dict]:
    """What the attempt's metric sink does first: open the job's run, or continue one."""
    from worker.execute import run_connector

    return run_connector(client, row(job_id), spec, attempt, [])()
