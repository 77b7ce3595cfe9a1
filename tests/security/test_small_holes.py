"""Issue 14, item 10: the small holes, one test each.

NUL characters, /metrics on the public port, unlimited invalid-key attempts, any string
as the bootstrap key, the worker's metrics port on every interface, example passwords
that start a compose stack, and a superuser database role for the services."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import yaml

from launcher.processes import run_migrations
from launcher.stack import stack_env
from tests.integration.conftest import ADMIN_KEY, PG_HOST, PG_PORT, PG_USER, free_port
from tests.security.api_stack import ApiStack, api_stack, bearer
from tests.security.conftest import Tenant

REPO_ROOT = Path(__file__).resolve().parents[2]
NUL = "\x00"
SMALL_CSV = b"f1,f2,label\n1,2,a\n2,3,a\n3,4,b\n4,5,b\n5,6,a\n6,7,b\n"


def test_a_nul_character_is_a_422_naming_the_field(stack, make_tenant) -> None:  # noqa: ANN001
    tenant: Tenant = make_tenant("nul", admin=True)
    job = tenant.api.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 1, "experiment": f"exp{NUL}x"})
    assert job.status_code == 422, job.text
    assert [d["field"] for d in job.json()["detail"]] == ["experiment"] and "NUL" in job.text

    upload = tenant.api.post("/v1/datasets", files={"file": ("d.csv", SMALL_CSV, "text/csv")},
                             data={"label": "label", "name": f"data{NUL}set"})  # fmt: skip
    assert upload.status_code == 422, upload.text
    assert [d["field"] for d in upload.json()["detail"]] == ["name"]

    key = tenant.api.post(f"/v1/projects/{tenant.project}/keys", json={"label": f"ci{NUL}"})
    assert key.status_code == 422, key.text
    assert [d["field"] for d in key.json()["detail"]] == ["label"]
    # Nothing was half-written.
    assert tenant.api.get("/v1/datasets").json()["items"] == []
    assert tenant.api.get("/v1/jobs").json()["items"] == []


def test_metrics_need_a_server_admin_key(stack, make_tenant) -> None:  # noqa: ANN001
    metrics = str(stack.api.base_url.join("/metrics"))
    assert httpx.get(metrics).status_code == 401
    plain: Tenant = make_tenant("metrics")
    project_admin: Tenant = make_tenant("metrics", admin=True)
    assert plain.api.get("/metrics").status_code == 403
    assert project_admin.api.get("/metrics").status_code == 403
    served = stack.api.get("/metrics")  # the bootstrap key: a server admin, as Prometheus's key is
    assert served.status_code == 200 and "descent_jobs" in served.text


@pytest.fixture(scope="module")
def guarded(make_database, tmp_path_factory) -> Iterator[ApiStack]:  # noqa: ANN001
    # A stack of its own: the attack blocks the test's address (127.0.0.1) there.
    with api_stack(make_database, tmp_path_factory.mktemp("guarded"), auth_failure_limit=5,
                   auth_failure_window_s=4.0) as guarded_stack:  # fmt: skip
        yield guarded_stack


def test_invalid_keys_are_rate_limited_per_address(guarded: ApiStack) -> None:
    tenant = guarded.tenant("honest")
    assert tenant.api.get("/v1/jobs").status_code == 200
    with httpx.Client(base_url=guarded.base_url, timeout=30) as guesser:
        answers = [guesser.get("/v1/jobs", headers=bearer("dsk_" + secrets.token_urlsafe(32))) for _ in range(8)]
        assert [a.status_code for a in answers[:5]] == [401] * 5
        assert [a.status_code for a in answers[5:]] == [429] * 3
        assert 0 < int(answers[-1].headers["Retry-After"]) <= 4
        # While the address is blocked no key is looked at, a valid one included: a guess
        # that happened to be right would learn nothing either.
        assert guesser.get("/v1/jobs", headers=bearer(tenant.key)).status_code == 429
        time.sleep(4.5)  # the window passes
        assert guesser.get("/v1/jobs", headers=bearer(tenant.key)).status_code == 200


def start_api_with_bootstrap_key(key: str, home: Path) -> subprocess.Popen:
    env = os.environ | {"DESCENT_HOME": str(home), "DESCENT_BOOTSTRAP_KEY": key, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(free_port())]
    return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


@pytest.mark.parametrize("key", ["admin", "it-admin", "ab" * 20, "change-me"], ids=["short", "short2", "repetitive", "example"])
def test_the_api_refuses_to_start_with_a_guessable_bootstrap_key(key: str, tmp_path: Path) -> None:
    api = start_api_with_bootstrap_key(key, tmp_path)
    try:
        output, _ = api.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        api.kill()
        api.communicate()
        pytest.fail(f"the API started with DESCENT_BOOTSTRAP_KEY={key!r}")
    assert api.returncode != 0 and "DESCENT_BOOTSTRAP_KEY" in output, output[-2000:]
    if len(key) > 8:  # (shorter ones are words of the traceback's file names)
        assert key not in output  # the refusal does not echo the key


def test_a_random_bootstrap_key_is_accepted(stack) -> None:  # noqa: ANN001
    # The shared stack runs with one ("it-admin-" and 32 random hex digits), and so does
    # `openssl rand -hex 32`'s kind of key.
    from jobs.settings import bootstrap_key_problem  # here: the suite also runs against code without it

    assert stack.api.get("/v1/jobs").status_code == 200
    assert bootstrap_key_problem(ADMIN_KEY) is None and bootstrap_key_problem(secrets.token_hex(32)) is None


def test_the_worker_metrics_port_listens_on_loopback_only(stack) -> None:  # noqa: ANN001
    port = stack.settings.worker_metrics_port
    deadline = time.monotonic() + 30
    while not (listening := [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]):
        assert time.monotonic() < deadline, f"nothing listens on the worker's metrics port {port}"
        time.sleep(0.5)
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening


# --------------------------------------------------------------------------- compose


def dotenv(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", path.read_text(), re.MULTILINE))


def preflight(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in env} | env | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "launcher.preflight"], env=clean, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_compose_refuses_to_start_with_the_example_secrets() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    check = compose["preflight"]
    assert check["command"] == ["python", "-m", "launcher.preflight"] and check["restart"] == "no"
    # Nothing that holds a secret starts before the check succeeded.
    assert compose["postgres"]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"

    def waits_for_preflight(name: str) -> bool:
        depends = compose[name].get("depends_on") or {}
        return "preflight" in depends or any(waits_for_preflight(d) for d in depends)

    holders = [name for name, svc in compose.items() if name != "preflight" and re.search(
        r"PASSWORD|SECRET|BOOTSTRAP", yaml.safe_dump(svc.get("environment") or {}))]  # fmt: skip
    assert holders and all(waits_for_preflight(name) for name in holders), holders

    example = dotenv(REPO_ROOT / ".env.example")
    refused = preflight(example)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    for secret in ("POSTGRES_PASSWORD", "DESCENT_DB_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
        assert re.search(rf"{secret} is (the example value|not set)", refused.stderr), (secret, refused.stderr)
    chosen = example | {name: secrets.token_hex(24) for name in ("POSTGRES_PASSWORD", "DESCENT_DB_PASSWORD",
                        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}  # fmt: skip
    assert preflight(chosen).returncode == 0
    assert preflight(chosen | {"DESCENT_BOOTSTRAP_KEY": "admin"}).returncode == 1


@pytest.fixture
def service_role() -> Iterator[dict[str, str]]:
    """deploy/postgres-init/10-descent-role.sh run as the postgres image runs it (as the
    superuser), against this machine's PostgreSQL, under names of its own."""
    suffix = uuid.uuid4().hex[:8]
    names = {"DESCENT_DB_USER": f"descent_{suffix}", "DESCENT_DB": f"descent_{suffix}", "MLFLOW_DB": f"mlflow_{suffix}"}
    env = os.environ | names | {"DESCENT_DB_PASSWORD": secrets.token_hex(24), "POSTGRES_USER": PG_USER,
                                "POSTGRES_DB": "postgres", "PGHOST": PG_HOST, "PGPORT": str(PG_PORT)}  # fmt: skip
    script = REPO_ROOT / "deploy" / "postgres-init" / "10-descent-role.sh"
    assert script.is_file(), f"{script} is missing"
    subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, timeout=60)
    try:
        yield names
    finally:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
            for database in (names["DESCENT_DB"], names["MLFLOW_DB"]):
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f'DROP ROLE IF EXISTS "{names["DESCENT_DB_USER"]}"')


def test_the_services_database_role_is_not_a_superuser(stack, service_role: dict[str, str]) -> None:  # noqa: ANN001
    role = service_role["DESCENT_DB_USER"]
    # Compose connects every service (and MLflow) as the role the script makes, never as `postgres`.
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    users = set(re.findall(r"postgresql\+psycopg://([^:@/]+)[:@]", compose))
    assert users == {"descent"} and 'role="${DESCENT_DB_USER:-descent}"' in (
        REPO_ROOT / "deploy" / "postgres-init" / "10-descent-role.sh").read_text()  # fmt: skip

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres") as conn:
        flags = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles "
                             "WHERE rolname = %s", (role,)).fetchone()  # fmt: skip
    assert flags == (False, False, False, False)

    # What the services need it can do: Descent's migrations on its own database.
    own_url = f"postgresql+psycopg://{role}@{PG_HOST}:{PG_PORT}/{service_role['DESCENT_DB']}"
    run_migrations(stack_env(stack.settings) | {"DATABASE_URL": own_url, "OPTUNA_STORAGE_URL": own_url})
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=role, dbname=service_role["MLFLOW_DB"]) as conn:
        conn.execute("CREATE TABLE mlflow_can_create_tables (id int)")

    # What a leaked DATABASE_URL must not reach: the server, other roles, other databases' tables.
    other_database = stack.settings.database_url.rsplit("/", 1)[1]
    refusals = [("postgres", "COPY (SELECT 1) TO PROGRAM 'true'"), ("postgres", "CREATE ROLE intruder SUPERUSER"),
                ("postgres", "CREATE DATABASE intruder"), ("postgres", "SELECT * FROM pg_authid"),
                (other_database, "SELECT * FROM api_keys")]  # fmt: skip
    for database, statement in refusals:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=role, dbname=database, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
