"""Where a checkpoint is kept (worker/checkpoint_store.py) without an MLflow server: the inline
path with its checksum, the threshold, a store that does not answer, the rows' rules. The
artifact store itself is exercised against the real MLflow server (local directory and S3)
in tests/integration/test_artifact_store.py."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from jobs import repository
from jobs.artifact_store import ArtifactStoreUnreachable, sha256_of
from jobs.db import session_scope
from jobs.models import JobCheckpoint
from jobs.settings import settings
from tests.unit.test_recovery import claim, new_job, only_these_jobs  # noqa: F401 - its fixture too
from worker import checkpoint_store
from worker.checkpoint_store import CheckpointCorrupt, CheckpointUnavailable, read_checkpoint, store_checkpoint
from worker.execute import describe_failure
from worker.monitor import KEEP_WAITING_FLUSHES, JobReporter


def stored_row(job_id: uuid.UUID) -> JobCheckpoint:
    with session_scope() as session:
        row = repository.load_checkpoint(session=session, job_id=job_id)
    assert row is not None
    return row


@pytest.fixture
def no_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking URI where nothing listens, and no waiting for it."""
    monkeypatch.setattr(settings, "mlflow_tracking_uri", "http://127.0.0.1:9")  # discard: refused at once
    monkeypatch.setattr(settings, "artifact_store_wait_s", 0.0)


def test_a_small_checkpoint_stays_in_its_row_with_its_checksum_and_reads_back() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    data = b"weights" * 100
    assert store_checkpoint(job_id=job_id, attempt=attempt, step=8, epoch=1, data=data)
    row = stored_row(job_id)
    assert (row.data, row.object_uri, row.size_bytes, row.sha256) == (data, None, len(data), sha256_of(data))
    assert read_checkpoint(row) == data
    assert checkpoint_store.where_kept(row) == "PostgreSQL"


def test_an_inline_checkpoint_that_no_longer_matches_its_checksum_fails_clearly() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    assert store_checkpoint(job_id=job_id, attempt=attempt, step=8, epoch=1, data=b"the real state")
    with session_scope() as session:
        session.execute(update(JobCheckpoint).where(JobCheckpoint.job_id == job_id).values(data=b"the real stat3"))
    with pytest.raises(CheckpointCorrupt) as caught:
        read_checkpoint(stored_row(job_id))
    error_type, message = describe_failure(caught.value)
    assert error_type == "checkpoint_corrupt"
    assert "checkpoint of step 8" in message and "will not resume from it" in message


def test_a_checkpoint_row_from_before_checksums_reads_as_it_was() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    with session_scope() as session:  # as migration 0017 leaves an older row: bytes, nothing else
        repository.save_checkpoint(session=session, job_id=job_id, attempt=attempt, step=4, epoch=0, data=b"old")
    row = stored_row(job_id)
    assert row.sha256 is None and read_checkpoint(row) == b"old"


def test_over_the_threshold_a_checkpoint_goes_to_the_store_and_no_row_is_written_when_it_fails(
    monkeypatch: pytest.MonkeyPatch, no_mlflow: None
) -> None:
    monkeypatch.setattr(settings, "checkpoint_inline_max_bytes", 10)
    assert not checkpoint_store.goes_to_store(10) and checkpoint_store.goes_to_store(11)
    job_id = new_job()
    attempt = claim(job_id)
    with pytest.raises(ArtifactStoreUnreachable, match="did not answer PUT mlflow-artifacts:/descent/checkpoints/"):
        store_checkpoint(job_id=job_id, attempt=attempt, step=8, epoch=1, data=b"x" * 11)
    with session_scope() as session:
        assert repository.load_checkpoint(session=session, job_id=job_id) is None  # the monitor tries again later
    assert store_checkpoint(job_id=job_id, attempt=attempt, step=8, epoch=1, data=b"x" * 10)  # inline: no store needed


def test_a_stored_checkpoint_the_store_cannot_give_back_fails_the_job_saying_why(no_mlflow: None) -> None:
    job_id = new_job()
    attempt = claim(job_id)
    uri = checkpoint_store.checkpoint_uri(job_id, attempt, 8)
    assert uri == f"mlflow-artifacts:/descent/checkpoints/{job_id}/{attempt}-8.pt"
    with session_scope() as session:
        repository.save_checkpoint(session=session, job_id=job_id, attempt=attempt, step=8, epoch=1, object_uri=uri,
                                   size_bytes=5, sha256=sha256_of(b"state"))  # fmt: skip
    with pytest.raises(CheckpointUnavailable) as caught:
        read_checkpoint(stored_row(job_id))
    error_type, message = describe_failure(caught.value)
    assert error_type == "checkpoint_unavailable"
    assert "could not be read for 0 s (ARTIFACT_STORE_WAIT_S)" in message and uri in message


def test_saving_says_which_stored_object_the_new_checkpoint_replaced() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    first, second = (checkpoint_store.checkpoint_uri(job_id, attempt, step) for step in (4, 8))

    def save(**where: object) -> repository.SavedCheckpoint | None:
        with session_scope() as session:
            return repository.save_checkpoint(session=session, job_id=job_id, attempt=attempt, step=4, epoch=0,
                                              size_bytes=1, sha256="0" * 64, **where)  # fmt: skip

    assert save(object_uri=first).replaced_object_uri is None
    assert save(object_uri=first).replaced_object_uri is None  # the same object again: never delete it
    assert save(object_uri=second).replaced_object_uri == first
    assert save(data=b"x").replaced_object_uri == second  # below the threshold now: the object goes too
    assert save(object_uri=first).replaced_object_uri is None


def test_a_checkpoint_row_holds_its_bytes_or_a_pointer_never_both_nor_neither() -> None:
    job_id = new_job()
    attempt = claim(job_id)
    for where in ({}, {"data": b"x", "object_uri": "mlflow-artifacts:/descent/checkpoints/x"}):
        with pytest.raises(IntegrityError), session_scope() as session:
            repository.save_checkpoint(session=session, job_id=job_id, attempt=attempt, step=4, epoch=0, **where)


def test_a_checkpoint_on_its_way_to_the_store_does_not_hold_up_the_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that takes the connection and never answers (a slow upload of hundreds of MB):
    the monitor's tick returns at once, its next tick does not start a second upload, and
    its lease renewals go on meanwhile."""
    import socket
    import time

    from worker.monitor import JobMonitor, JobReporter, PendingCheckpoint

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever reads them
    monkeypatch.setattr(settings, "mlflow_tracking_uri", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(settings, "checkpoint_inline_max_bytes", 10)
    job_id = new_job()
    attempt = claim(job_id)
    reporter = JobReporter(None)
    monitor = JobMonitor(job_id, reporter, interval_s=60, attempt=attempt, lease_s=30)
    pending = reporter.pending_checkpoint = PendingCheckpoint(8, 1, b"x" * 11, 0)
    try:
        started = time.monotonic()
        monitor.store_ready_checkpoint()
        first = monitor._storing
        monitor.store_ready_checkpoint()
        assert time.monotonic() - started < 1.0
        assert first is not None and first.is_alive() and monitor._storing is first  # one upload at a time
        assert monitor.write_progress() == "running"  # the heartbeat is not behind the upload
        assert reporter.pending_checkpoint is pending  # not stored yet: kept for the next try
    finally:
        silent.close()  # the upload fails now; the checkpoint stays pending
    first.join(timeout=60)
    assert not first.is_alive() and reporter.pending_checkpoint is pending
    with session_scope() as session:
        assert repository.load_checkpoint(session=session, job_id=job_id) is None


def test_an_upload_the_artifact_store_does_not_take_is_a_503_and_leaves_no_row(
    client, monkeypatch: pytest.MonkeyPatch, no_mlflow: None  # noqa: ANN001
) -> None:
    from sqlalchemy import func, select

    from jobs.models import Dataset
    from tests.unit.test_datasets import table_csv, upload

    monkeypatch.setattr(settings, "dataset_inline_max_bytes", 0)  # every upload goes to the store
    with session_scope() as session:
        before = session.scalar(select(func.count()).select_from(Dataset))
    refused = upload(client, table_csv(seed=1701), label="species")
    assert refused.status_code == 503, refused.text
    assert "artifact store" in refused.json()["detail"] and refused.headers["Retry-After"] == "10"
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == before


class CountingSink:
    """What JobReporter reads of a metric sink: how many points were added, how often it flushes."""

    flush_interval_s = 1.0
    added = 0

    def end_window(self) -> None:
        pass


def test_a_checkpoint_waiting_for_its_metrics_is_not_replaced_until_it_has_waited_a_few_flushes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Checkpoints offered faster than the sink flushes: replacing the waiting one at every
    # offer would leave none ever stored while the job trains.
    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    reporter = JobReporter(CountingSink(), checkpoint_min_interval_s=0.0)  # type: ignore[arg-type]
    reporter.save_checkpoint(100, lambda: {"step": 100})
    first = reporter.pending_checkpoint
    assert first is not None and first.step == 100
    clock["now"] += 0.3
    reporter.save_checkpoint(200, lambda: {"step": 200})
    assert reporter.pending_checkpoint is first  # kept: its metrics are a flush away
    clock["now"] += KEEP_WAITING_FLUSHES * CountingSink.flush_interval_s
    reporter.save_checkpoint(900, lambda: {"step": 900})
    assert reporter.pending_checkpoint.step == 900  # it waited long enough (MLflow slow or down): the newest waits
