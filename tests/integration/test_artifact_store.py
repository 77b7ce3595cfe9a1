"""Large state in MLflow's artifact store, through the real MLflow server's artifact proxy:
with CHECKPOINT_INLINE_MAX_BYTES and DATASET_INLINE_MAX_BYTES at 0 every checkpoint and every
upload goes there, and PostgreSQL keeps only the pointer, size and SHA-256.

- A job SIGKILLed mid-run resumes exactly (every step's values those of a job never stopped)
  from the object, and only the latest checkpoint's object is kept.
- A checkpoint changed in the store fails the resume as `checkpoint_corrupt`.
- An upload lives in the store, a worker trains on it, deleting it deletes the object.
- The same checkpoint path against an S3-protocol server: moto's standalone server (no MinIO
  server installs on this machine; docker-compose runs MinIO), as MLflow's
  `--artifacts-destination s3://...` with MLFLOW_S3_ENDPOINT_URL.
- Checkpoint objects no row points to are noted by the reaper's sweep and deleted after the
  grace (local store and S3); objects in use, one just written, and objects of jobs this
  database does not have (another deployment's) are kept.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine, text

from jobs.artifact_store import object_uri
from launcher.processes import wait_http
from launcher.stack import stack_env
from tests.integration.conftest import ADMIN_KEY, Stack, free_port, running_stack, stack_settings
from tests.integration.test_crash_recovery import worker_pid
from tests.integration.test_datasets import blobs_csv
from tests.integration.test_job_lifecycle import DIGITS_ADAM, events

pytestmark = pytest.mark.integration

# 3450 steps. A checkpoint is stored once MLflow has every metric logged before it, and a newer
# one replaces it meanwhile: points every 20 steps and checkpoints every 500 let the metrics
# catch up between two checkpoints even on a loaded machine (the job takes seconds).
LOG_EVERY = 20
# Long enough (11,500 steps, several seconds) that a kill after a stored checkpoint lands
# while the job still trains: a checkpoint is stored once MLflow has every metric before it
# (the sink flushes every second), so a short job stores its first one near its end.
JOB = DIGITS_ADAM | {"epochs": 500, "checkpoint_every_steps": 500, "log_every_steps": LOG_EVERY, "seed": 7}
BUCKET = "descent-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
EVERYTHING_TO_THE_STORE = {
    "checkpoint_inline_max_bytes": 0,
    "dataset_inline_max_bytes": 0,
    # Short leases and frequent recovery passes, so a killed worker is noticed in seconds.
    "lease_s": 3.0,
    "reaper_interval_s": 1.0,
    "unclaimed_requeue_s": 5.0,
    "checkpoint_min_interval_s": 0.0,
    "bootstrap_key": ADMIN_KEY,
    "log_model": False,
    "system_metrics_interval_s": 0.0,
    # The reaper's sweep of unused objects runs every 2 s; with the hour's grace it only notes them.
    "artifact_sweep_interval_s": 2.0,
}
# What the sweep run by hand is given: objects noted unused this long ago are deleted. Longer
# than the reaper's interval plus the command's start (its imports take 4 s under load), so
# the object written just before it is never that old.
SWEEP_GRACE_S = 15.0


def open_stack(make_database, home: Path, name: str, **overrides: object) -> Iterator[Stack]:  # noqa: ANN001
    settings = stack_settings(make_database, home, name, **EVERYTHING_TO_THE_STORE | overrides)
    # Two job slots: a job and its never-stopped reference train side by side.
    with running_stack(settings, home, workers=1, concurrency=2) as (group, api):
        yield Stack(settings, group, api, MlflowClient(settings.mlflow_tracking_uri), None)


@pytest.fixture(scope="module")
def store_stack(make_database, tmp_path_factory) -> Iterator[Stack]:  # noqa: ANN001
    yield from open_stack(make_database, tmp_path_factory.mktemp("descent-artstore"), "descent_art")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on a free port, with an empty bucket; its endpoint URL."""
    import boto3

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/", timeout_s=60)
        boto3.client("s3", endpoint_url=endpoint, **s3_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def s3_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}  # fmt: skip


@pytest.fixture(scope="module")
def s3_stack(make_database, tmp_path_factory, s3_server: str) -> Iterator[Stack]:  # noqa: ANN001
    # The MLflow server (a child of the stack) reads the S3 endpoint and credentials from its environment.
    with pytest.MonkeyPatch.context() as env:
        for name, value in (S3_ENV | {"MLFLOW_S3_ENDPOINT_URL": s3_server}).items():
            env.setenv(name, value)
        yield from open_stack(make_database, tmp_path_factory.mktemp("descent-s3"), "descent_s3",
                              mlflow_artifacts_destination=f"s3://{BUCKET}/mlartifacts")  # fmt: skip


def one_row(stack: Stack, sql: str, row_id: str) -> dict | None:
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text(sql), {"id": row_id}).mappings().first()
    finally:
        engine.dispose()
    return dict(row) if row else None


def checkpoint_row(stack: Stack, job_id: str) -> dict | None:
    return one_row(stack, "SELECT step, attempt, data IS NULL AS no_bytes, object_uri, size_bytes, sha256 "
                          "FROM job_checkpoints WHERE job_id = :id", job_id)  # fmt: skip


def dataset_row(stack: Stack, dataset_id: str) -> dict | None:
    return one_row(stack, "SELECT data IS NULL AS no_bytes, object_uri, object_size_bytes, object_sha256 "
                          "FROM datasets WHERE id = :id", dataset_id)  # fmt: skip


def wait_for_stored_checkpoint(stack: Stack, job_id: str, past_step: int) -> dict:
    deadline = time.monotonic() + 180
    while True:
        row = checkpoint_row(stack, job_id)
        if row is not None and row["step"] >= past_step:
            return row
        assert time.monotonic() < deadline, f"job {job_id} stored no checkpoint past step {past_step}: {row}"
        time.sleep(0.1)


def local_path(stack: Stack, uri: str) -> Path:
    """Where the local artifact destination keeps `mlflow-artifacts:/<key>`."""
    return Path(stack.settings.mlflow_artifacts_destination) / uri.removeprefix("mlflow-artifacts:/")


def worker_log(stack: Stack) -> str:
    logs = Path(stack.settings.descent_home) / "logs"
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))


def killed_and_resumed(stack: Stack, spec: dict, kill_after_step: int) -> tuple[dict, dict]:
    """Submit `spec`, SIGKILL its worker process once a checkpoint past `kill_after_step` is
    stored, wait for the job's end; (the checkpoint killed at, the ended job)."""
    job = stack.submit(spec)
    killed_at = wait_for_stored_checkpoint(stack, job["id"], kill_after_step)
    os.kill(worker_pid(stack, job["id"]), signal.SIGKILL)
    done = stack.wait(job["id"], timeout_s=300)
    return killed_at, done


def assert_resumed_from_the_store(stack: Stack, done: dict, killed_at: dict) -> None:
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert ("running", "queued") in events(stack, done["id"])  # the reaper requeued it
    assert killed_at["no_bytes"] and killed_at["object_uri"].startswith(
        f"mlflow-artifacts:/descent/checkpoints/{done['id']}/1-"
    ), killed_at
    # The second attempt read its checkpoint back from the store (the first's, or a later one of
    # the first's stored while the kill was on its way), checked against its SHA-256.
    resumed = f"job {done['id']} attempt 2 resumes from step "
    line = next((line for line in worker_log(stack).splitlines() if resumed in line), None)
    assert line is not None and f"checkpoint read from mlflow-artifacts:/descent/checkpoints/{done['id']}/1-" in line
    assert "SHA-256 checked" in line
    got = stack.api.get(f"/v1/jobs/{done['id']}/metrics").json()
    assert [p["step"] for p in got["train_loss"]] == list(range(0, done["progress"]["total_steps"], LOG_EVERY))


def test_a_job_killed_midway_resumes_exactly_from_its_checkpoint_in_the_store(store_stack: Stack) -> None:
    stack = store_stack
    reference = stack.submit(JOB | {"name": "it-store-never-stopped"})
    killed_at, done = killed_and_resumed(stack, JOB | {"name": "it-store-killed"}, kill_after_step=1000)
    assert_resumed_from_the_store(stack, done, killed_at)

    # Exactly as if never stopped: every step's values equal those of the reference.
    reference = stack.wait(reference["id"], timeout_s=300)
    assert reference["status"] == "succeeded", reference["error"]
    got = stack.api.get(f"/v1/jobs/{done['id']}/metrics").json()
    want = stack.api.get(f"/v1/jobs/{reference['id']}/metrics").json()
    for key in ("train_loss", "lr", "grad_norm"):
        assert [p["value"] for p in got[key]] == [p["value"] for p in want[key]], key
    assert done["metrics"] == reference["metrics"]

    # PostgreSQL holds the pointer and checksum; the store holds one object per job, the last one.
    last = checkpoint_row(stack, done["id"])
    assert last["no_bytes"] and last["step"] >= killed_at["step"]
    name = f"{last['attempt']}-{last['step']}.pt"
    assert last["object_uri"] == f"mlflow-artifacts:/descent/checkpoints/{done['id']}/{name}"
    stored = local_path(stack, last["object_uri"])
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == last["sha256"]
    assert stored.stat().st_size == last["size_bytes"]
    assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]  # the superseded ones were deleted


def test_a_checkpoint_changed_in_the_store_fails_the_resume_clearly(store_stack: Stack) -> None:
    stack = store_stack
    job = stack.submit(JOB | {"name": "it-store-corrupt"})
    wait_for_stored_checkpoint(stack, job["id"], 500)
    pid = worker_pid(stack, job["id"])
    os.kill(pid, signal.SIGSTOP)  # frozen: it writes no newer checkpoint while this one is damaged
    try:
        row = checkpoint_row(stack, job["id"])
        stored = local_path(stack, row["object_uri"])
        damaged = bytearray(stored.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF  # one bit pattern, same size: only the checksum tells
        stored.write_bytes(bytes(damaged))
    finally:
        os.kill(pid, signal.SIGKILL)
    done = stack.wait(job["id"], timeout_s=120)
    assert done["status"] == "failed" and done["attempts"] == 2, done
    assert done["error"]["type"] == "checkpoint_corrupt", done["error"]
    message = done["error"]["message"]
    assert f"the checkpoint of step {row['step']}" in message and "is not the one this job stored" in message, message
    assert row["object_uri"] in message and "will not resume from it" in message
    assert stack.mlflow.get_run(done["mlflow"]["run_id"]).info.status == "FAILED"


def test_an_upload_lives_in_the_store_and_a_worker_trains_on_it(store_stack: Stack) -> None:
    stack = store_stack
    content = blobs_csv()
    uploaded = stack.api.post("/v1/datasets", files={"file": ("blobs.csv", content)}, data={"label": "kind"})
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    row = dataset_row(stack, dataset["id"])
    assert row["no_bytes"] and row["object_uri"] == f"mlflow-artifacts:/descent/datasets/default/{dataset['id']}.npz"
    stored = local_path(stack, row["object_uri"])
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["object_sha256"]

    again = stack.api.post("/v1/datasets", files={"file": ("again.csv", content)}, data={"label": "kind"})
    assert again.status_code == 200 and again.json()["id"] == dataset["id"]
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # the second copy was not kept

    spec = {"name": "it-store-upload", "experiment": "integration", "epochs": 10, "batch_size": 32,
            "dataset": {"id": dataset["id"], "val_fraction": 0.25}, "optimizer": {"name": "adam", "lr": 0.01}}
    job = stack.submit(spec)
    done = stack.wait(job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["val_accuracy"] > 0.9

    # Arrays changed in the store: a job on them fails saying so, it does not train on them.
    damaged = bytearray(stored.read_bytes())
    damaged[-100] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    failed = stack.wait(stack.submit(spec | {"name": "it-store-upload-damaged"})["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "dataset_corrupt", failed
    assert "are not those stored at upload" in failed["error"]["message"], failed["error"]

    assert stack.api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert not stored.exists()


def test_the_same_checkpoint_path_against_an_s3_server(s3_stack: Stack, s3_server: str) -> None:
    import boto3

    stack = s3_stack
    killed_at, done = killed_and_resumed(stack, JOB | {"name": "it-s3-killed"}, kill_after_step=500)
    assert_resumed_from_the_store(stack, done, killed_at)

    # The object is in the bucket (under the server's artifacts destination), alone, and reads
    # back with the checksum PostgreSQL keeps.
    last = checkpoint_row(stack, done["id"])
    s3 = boto3.client("s3", endpoint_url=s3_server, **s3_credentials())
    prefix = f"mlartifacts/descent/checkpoints/{done['id']}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    assert keys == [prefix + last["object_uri"].rsplit("/", 1)[1]]
    body = s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == last["sha256"] and len(body) == last["size_bytes"]


def put_raw(stack: Stack, uri: str, data: bytes) -> None:
    """An object written through the MLflow server's artifact proxy, with no row for it."""
    key = uri.removeprefix("mlflow-artifacts:/")
    url = f"{stack.settings.mlflow_tracking_uri}/api/2.0/mlflow-artifacts/artifacts/{key}"
    assert httpx.put(url, content=data, timeout=30).status_code == 200


def noted_unused(stack: Stack) -> set[str]:
    """The objects the sweeps have noted as unused (Redis, under the stack's queue name)."""
    client = redis.Redis.from_url(stack.settings.events_url)
    key = f"descent:{stack.settings.queue_name}:artifact-sweep:unused-since"
    return {k.decode() for k in client.hkeys(key)}


def sweep_now(stack: Stack) -> str:
    """`python -m worker.artifact_sweeper` with the stack's settings and a short grace."""
    env = stack_env(stack.settings) | {"ARTIFACT_ORPHAN_GRACE_S": str(SWEEP_GRACE_S)}
    done = subprocess.run([sys.executable, "-m", "worker.artifact_sweeper"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_unused_objects_are_swept(stack: Stack, exists: Callable[[str], bool]) -> None:
    # Long enough to store checkpoints while it trains (on an idle machine a short job ends
    # before the sink's first flush lets one be stored, and keeps none).
    job = stack.submit(JOB | {"name": "it-store-swept"})
    # Unused: checkpoints of attempts killed before their rows. Written while the job runs: a
    # sweeping process lists an ended job's folder no more once it found nothing unused there.
    unused = [object_uri("checkpoints", job["id"], "9-10.pt"), object_uri("checkpoints", job["id"], "9-20.pt")]
    # Not this deployment's (a job this database does not have; an upload): never touched.
    foreign = [object_uri("checkpoints", str(uuid.uuid4()), "1-5.pt"),
               object_uri("datasets", "default", f"{uuid.uuid4()}.npz")]  # fmt: skip
    for uri in unused + foreign:
        put_raw(stack, uri, b"left behind")
    wait_for_stored_checkpoint(stack, job["id"], 500)
    job = stack.wait(job["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    in_use = checkpoint_row(stack, job["id"])["object_uri"]  # a finished job's last checkpoint

    # The reaper's sweep notes the unused ones within its interval, and deletes nothing within the grace.
    deadline = time.monotonic() + 60
    while not set(unused) <= noted_unused(stack) or in_use in noted_unused(stack):
        assert time.monotonic() < deadline, f"the reaper's sweep noted {noted_unused(stack)}, not {unused}"
        time.sleep(0.2)
    assert not set(foreign) & noted_unused(stack)
    assert all(exists(uri) for uri in [*unused, *foreign, in_use])

    time.sleep(SWEEP_GRACE_S)
    just_written = object_uri("checkpoints", job["id"], "9-30.pt")  # as if its row were on its way
    put_raw(stack, just_written, b"being stored")
    out = sweep_now(stack)
    assert "unused ones deleted" in out, out
    for uri in unused:
        assert f"deleted {uri}" in out and not exists(uri), (uri, out)
    assert exists(in_use) and exists(just_written) and all(exists(uri) for uri in foreign), out
    # The deleted ones leave the notes (at the latest at the reaper's next sweep).
    deadline = time.monotonic() + 60
    while set(unused) & noted_unused(stack):
        assert time.monotonic() < deadline, noted_unused(stack)
        time.sleep(0.2)
    assert stack.api.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_objects_no_row_points_to_are_deleted_after_the_grace(store_stack: Stack) -> None:
    assert_unused_objects_are_swept(store_stack, lambda uri: local_path(store_stack, uri).exists())


def test_objects_no_row_points_to_are_deleted_from_s3_too(s3_stack: Stack, s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, **s3_credentials())

    def exists(uri: str) -> bool:
        key = "mlartifacts/" + uri.removeprefix("mlflow-artifacts:/")
        return bool(s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount"))

    assert_unused_objects_are_swept(s3_stack, exists)
