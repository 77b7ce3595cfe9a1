"""How many job submissions and job reads the API answers per second (issue 17, "The API
scales out").

Starts the API the way `make up` does (launcher.processes.api_command, API_WORKERS
processes) against a fresh PostgreSQL database and the machine's Redis under a private
queue; no worker and no MLflow server: the jobs stay queued. The bootstrap admin key
submits (or, with --projects N, a plain key of each of N projects made for the run: a key
looked up in the database, and submissions of one project no longer all waiting on one
project's quota lock), and MAX_ACTIVE_JOBS_PER_PROJECT is raised for the run so that the
queued jobs stay within the quota. Then, with CONCURRENCY connections kept alive, each
sending its next request as soon as the previous answer came (a bounded loop of
REQUESTS in all), after a warm-up that is not counted:

1. POST /v1/jobs (a small digits job), REQUESTS times: each must answer 201;
2. GET /v1/jobs/{id} over the jobs just created, REQUESTS times: each must answer 200.

The client is a small asyncio HTTP/1.1 client (uvloop when present): on a 2-core machine
the load generator competes with the API for the cores, and httpx's own cost per request
would be measured as the API's. Its CPU is reported beside the API's, PostgreSQL's and
Redis's.

Output lines (exact): `API processes: <n>`,
`POST /v1/jobs: <n>/s, p50 <ms> ms, p99 <ms> ms` and
`GET /v1/jobs/{id}: <n>/s, p50 <ms> ms, p99 <ms> ms`, each followed by its CPU line.

  PYTHONPATH=$PWD .venv/bin/python bench/api_throughput.py [--api-workers N] [--requests 2000] [--concurrency 16]
      [--projects 1] [--history 0]

Needs PostgreSQL (TEST_PG_HOST/PORT/USER, default 127.0.0.1:5432 postgres) and Redis
(TEST_REDIS_URL, default redis://127.0.0.1:6379/15), as the integration tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import PG_HOST, PG_PORT, PG_USER, REDIS_URL, admin_sql, database_backends, free_port  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from launcher.processes import ProcessGroup, api_command, run_migrations, wait_http  # noqa: E402
from launcher.stack import stack_env  # noqa: E402

WARM_UP_REQUESTS = 200  # per phase, not counted: connections opened, code paths warm in every process

JOB = {
    "name": "api-throughput", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
    "optimizer": {"name": "adam", "lr": 0.001}, "epochs": 5, "batch_size": 64, "seed": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- the client


class Connection:
    """One keep-alive HTTP/1.1 connection: a request out, its whole answer back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"transfer-encoding":
                raise RuntimeError("chunked answers are not expected from these routes")
        return status, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


def post_request(key: str, body: bytes) -> bytes:
    return (b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)  # fmt: skip


def get_request(key: str, job_id: str) -> bytes:
    return (f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n").encode()


@dataclass
class Phase:
    latencies_s: list[float] = field(default_factory=list)
    bodies: list[tuple[int, bytes]] = field(default_factory=list)  # (connection's index, body)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: dict[str, float] = field(default_factory=dict)


async def run_phase(connections: list[Connection], count: int, build: Callable[[int, int], bytes], expected: int,
                    keep_bodies: bool) -> Phase:  # fmt: skip
    """Send `count` requests, `build(connection's index, request's number)`, each connection
    taking the next number as soon as its previous answer came."""
    phase = Phase()
    numbers = iter(range(count))

    async def loop(index: int, connection: Connection) -> None:
        for n in numbers:  # one shared iterator: a bounded loop over all connections
            raw = build(index, n)
            sent = time.perf_counter()
            status, body = await connection.request(raw)
            phase.latencies_s.append(time.perf_counter() - sent)
            if status != expected:
                phase.failures.append(f"{status}: {body[:200]!r}")
            elif keep_bodies:
                phase.bodies.append((index, body))

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(i, c) for i, c in enumerate(connections)))
    phase.wall_s, phase.client_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return phase


# --------------------------------------------------------------------------- CPU of the others


def server_cpu(api_pid: int, database: str) -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} of the API's processes, PostgreSQL's backends serving
    the bench's database, and the Redis server."""
    used: dict[int, tuple[str, float]] = {}

    def add(kind: str, process: psutil.Process) -> None:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return
        used[process.pid] = (kind, times.user + times.system)

    api = psutil.Process(api_pid)
    for process in [api, *api.children(recursive=True)]:
        add("api", process)
    for pid in database_backends([database]):
        try:
            add("postgres", psutil.Process(pid))
        except psutil.Error:
            continue
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "redis-server":
            add("redis", process)
    return used


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        spent[kind] = spent.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    return dict(sorted(spent.items()))


def api_processes(api_pid: int) -> int:
    """The processes that answer requests: uvicorn's workers, or uvicorn itself when it runs alone."""
    children = [c for c in psutil.Process(api_pid).children() if "multiprocessing" not in " ".join(c.cmdline())
                or "spawn_main" in " ".join(c.cmdline())]  # fmt: skip
    workers = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    return len(workers) or 1


# --------------------------------------------------------------------------- the run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(label: str, phase: Phase, requests: int) -> None:
    rate = requests / phase.wall_s
    print(f"{label}: {rate:.0f}/s, p50 {statistics.median(phase.latencies_s) * 1000:.1f} ms, "
          f"p99 {percentile(phase.latencies_s, 99) * 1000:.1f} ms")  # fmt: skip
    cpu = dict(phase.server_cpu_s, client=phase.client_cpu_s)
    print("  CPU per request (ms): " + ", ".join(f"{k} {v / requests * 1000:.2f}" for k, v in cpu.items())
          + f"; wall {phase.wall_s:.2f} s for {requests} requests, {len(phase.failures)} failed")  # fmt: skip
    for failure in phase.failures[:5]:
        print(f"  failed: {failure}")


async def measure(port: int, keys: list[str], api_pid: int, database: str, concurrency: int,
                  requests: int, history: int = 0) -> list[str]:  # fmt: skip
    """Both phases and their report; the ids of the jobs created. Connection i sends with
    keys[i % len(keys)] (one project's key each), and reads back its own project's jobs."""
    connections = [await Connection.open(port) for _ in range(concurrency)]
    body = json.dumps(JOB).encode()
    posts_by_key = [post_request(key, body) for key in keys]

    def post(index: int, _n: int) -> bytes:
        return posts_by_key[index % len(keys)]

    try:
        warm = await run_phase(connections, WARM_UP_REQUESTS, post, 201, keep_bodies=True)
        if warm.failures:
            raise SystemExit(f"warm-up submissions failed: {warm.failures[:3]}")
        if history:
            add_history(database, history)
            # uvicorn closes a keep-alive connection idle for 5 s: new ones for the measured phases.
            for connection in connections:
                connection.close()
            connections[:] = [await Connection.open(port) for _ in range(concurrency)]
        before = server_cpu(api_pid, database)
        posts = await run_phase(connections, requests, post, 201, keep_bodies=True)
        posts.server_cpu_s = cpu_between(before, server_cpu(api_pid, database))
        ids_by_key: list[list[str]] = [[] for _ in keys]
        for index, answer in warm.bodies + posts.bodies:
            ids_by_key[index % len(keys)].append(json.loads(answer)["id"])

        def get(index: int, n: int) -> bytes:
            own = ids_by_key[index % len(keys)]
            return get_request(keys[index % len(keys)], own[n % len(own)])

        await run_phase(connections, WARM_UP_REQUESTS, get, 200, keep_bodies=False)
        before = server_cpu(api_pid, database)
        gets = await run_phase(connections, requests, get, 200, keep_bodies=False)
        gets.server_cpu_s = cpu_between(before, server_cpu(api_pid, database))
    finally:
        for connection in connections:
            connection.close()
    ids = [job_id for own in ids_by_key for job_id in own]
    print(f"API processes: {api_processes(api_pid)}")
    print(f"clients: {concurrency} keep-alive connections, {requests} requests a phase (after {WARM_UP_REQUESTS} "
          f"not counted), {len(keys)} project(s); machine: {len(os.sched_getaffinity(0))} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    report("POST /v1/jobs", posts, requests)
    report("GET /v1/jobs/{id}", gets, requests)
    return ids


def add_history(database: str, finished: int) -> None:
    """`finished` succeeded jobs in each project that submitted (copies of its warm-up jobs):
    the history a project that has run for a while carries."""
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO jobs (id, project, name, status, spec, created_at, finished_at, attempts, epoch, step, "
            "total_steps, latest_metrics, mlflow_run_to_end, objective_curve, trial_told) "
            "SELECT gen_random_uuid(), j.project, j.name, 'succeeded', j.spec, j.created_at, j.created_at, 1, 0, 0, "
            "j.total_steps, '{}', false, '[]', false "
            "FROM (SELECT DISTINCT ON (project) * FROM jobs) j, generate_series(1, %s)", (finished,))
        conn.execute("ANALYZE jobs")


def bench_keys(port: int, admin_key: str, projects: int) -> list[str]:
    """A project and a plain key of it for each of `projects`, made with the bootstrap key."""
    import httpx

    keys = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                      headers={"Authorization": f"Bearer {admin_key}"}) as admin:  # fmt: skip
        for i in range(projects):
            name = f"bench-{i}"
            admin.post("/v1/projects", json={"name": name}).raise_for_status()
            minted = admin.post(f"/v1/projects/{name}/keys", json={"label": "api-throughput"})
            minted.raise_for_status()
            keys.append(minted.json()["key"])
    return keys


def event_loop_factory():  # noqa: ANN201
    """uvloop's loop when it is installed (uvicorn[standard] brings it): a cheaper client."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def forget_in_redis(queue_name: str, job_ids: list[str]) -> None:
    """The private queue (a message per job) and the jobs' event streams: only the bench's own keys."""
    import redis

    from jobs.events import stream_key

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(queue_name)
    for start in range(0, len(job_ids), 500):
        client.delete(*[stream_key(job_id) for job_id in job_ids[start:start + 500]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-workers", type=int, default=None,
                        help="API processes (API_WORKERS); default: the setting's default")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections sending at once (default 16)")
    parser.add_argument("--projects", type=int, default=1,
                        help="projects the connections submit to (default 1: the bootstrap key's; more: a project "
                             "and key each, made through the API; one project's submissions wait for each other "
                             "on its quota lock)")  # fmt: skip
    parser.add_argument("--history", type=int, default=0,
                        help="finished jobs added to each project before the measured phases (default 0)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="api-throughput-"))
    database = f"apithroughput_{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{database}"')
    key = "bench-" + uuid.uuid4().hex
    overrides = {} if args.api_workers is None else {"api_workers": args.api_workers}
    settings = Settings(
        descent_home=home, database_url=f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
        broker_url=REDIS_URL, queue_name=f"api-throughput-{uuid.uuid4().hex[:8]}", api_port=free_port(),
        bootstrap_key=key, **overrides,
    )  # fmt: skip
    total = 2 * (WARM_UP_REQUESTS + args.requests)
    env = stack_env(settings) | {"MAX_ACTIVE_JOBS_PER_PROJECT": str(10 * total)}
    group = ProcessGroup(log_dir=home / "logs", env=env)
    ids: list[str] = []
    try:
        run_migrations(env)
        api = group.start("api", api_command(settings))
        wait_http(f"http://127.0.0.1:{settings.api_port}/healthz", api, group=group)
        keys = [key] if args.projects == 1 else bench_keys(settings.api_port, key, args.projects)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            ids = runner.run(measure(settings.api_port, keys, api.process.pid, database, args.concurrency,
                                     args.requests, args.history))  # fmt: skip
    finally:
        group.stop_all()
        admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        forget_in_redis(settings.queue_name, ids)


if __name__ == "__main__":
    main()
