"""docker-compose.yml: valid against the Compose spec, wired the way the design says,
and every command it runs points at code that exists.

No Docker engine is needed: the file is read as YAML, checked against the Compose
spec's JSON schema, and the commands are resolved to files without importing them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema.validators import validator_for

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
# The Compose spec schema travels with the repository (deploy/), so the test runs in any
# clone; where the team's shared copy sits beside the checkout, the two must agree.
COMPOSE_SCHEMA = REPO_ROOT / "deploy" / "compose-spec.json"
SHARED_COMPOSE_SCHEMA = REPO_ROOT.parent / "shared" / "compose-spec.json"

EXPECTED_SERVICES = {"postgres", "redis", "mlflow", "migrate", "api", "worker", "reaper", "flower"}
DATASTORES = ("postgres", "redis")
PROJECT_COMMANDS = {"uvicorn", "celery", "alembic", "mlflow", "python"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


# An override an operator may add (`docker compose -f docker-compose.yml -f <it>`): every test
# of the stack's shape runs on the base file and on the base with each override merged in.
MINIO_OVERRIDE = REPO_ROOT / "deploy" / "compose.minio.yml"
OVERRIDES = {"minio": MINIO_OVERRIDE}
# Options compose replaces rather than merges (Compose spec, "Merge and override").
REPLACED_WHOLE = {"command", "entrypoint", "test"}


def merged(base: object, override: object, key: str = "") -> object:
    """`override` laid over `base` as compose merges files: mappings key by key, the options
    above replaced, other sequences (volumes, networks, ports) appended without repeats."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for name, value in override.items():
            out[name] = merged(base[name], value, name) if name in base else value
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_WHOLE:
        return base + [item for item in override if item not in base]
    return override


@pytest.fixture(scope="module", params=["base", *OVERRIDES])
def compose(request: pytest.FixtureRequest) -> dict:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    base = yaml.safe_load(COMPOSE_FILE.read_text())
    if request.param == "base":
        return base
    return merged(base, yaml.safe_load(OVERRIDES[request.param].read_text()))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def command_of(service: dict) -> list[str]:
    command = service.get("command")
    assert command, "service has no command"
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def network_names(service: dict) -> set[str]:
    networks = service.get("networks")
    if networks is None:
        return {"default"}
    return set(networks)


def interpolated(text: str, unset: str = "x") -> str:
    """`text` as compose reads it with no variable set: `${V:-d}` and `${V-d}` give d, others `unset`."""

    def value(match: re.Match) -> str:
        modifier = match.group(2)
        for prefix in (":-", "-"):
            if modifier.startswith(prefix):
                return modifier[len(prefix) :]
        return unset

    return INTERPOLATION.sub(value, text)


def module_file(dotted: str) -> Path:
    """The source file of a dotted module under the repo root, found without importing it."""
    base = REPO_ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    pytest.fail(f"module {dotted!r} has no file: expected {base.with_suffix('.py')} or {base / '__init__.py'}")


def defines_top_level(source: str, name: str) -> bool:
    """`name = ...`, `name: T = ...` or `def name` at module level."""
    pattern = rf"^(?:{re.escape(name)}\s*(?::[^=\n]*)?=(?!=)|(?:async\s+)?def\s+{re.escape(name)}\b)"
    return re.search(pattern, source, re.MULTILINE) is not None


def services_running(services: dict, program: str) -> dict[str, list[str]]:
    commands = {name: command_of(svc) for name, svc in services.items() if svc.get("command")}
    found = {name: argv for name, argv in commands.items() if argv[0] == program}
    assert found, f"no service runs {program}"
    return found


def option_value(argv: list[str], *names: str) -> str:
    """Value of `--name value`, `--name=value` or `-n value` in argv."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    pytest.fail(f"none of {names} given in {argv}")


# --------------------------------------------------------------------------- the spec


def test_the_vendored_compose_spec_is_the_shared_one() -> None:
    assert COMPOSE_SCHEMA.is_file(), f"{COMPOSE_SCHEMA} is missing: copy it from ../shared/compose-spec.json"
    if SHARED_COMPOSE_SCHEMA.is_file():  # absent in a bare clone; present in CI and on our machines
        assert json.loads(COMPOSE_SCHEMA.read_text()) == json.loads(SHARED_COMPOSE_SCHEMA.read_text()), (
            f"{COMPOSE_SCHEMA} differs from {SHARED_COMPOSE_SCHEMA}: copy the shared one over"
        )


def test_compose_file_is_valid_against_the_compose_spec(compose: dict) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = validator_for(schema, default=None)
    if validator_class is None:
        # The spec names its draft as https://json-schema.org/draft-07/schema; jsonschema
        # registers the meta-schemas under their canonical http:// ids.
        canonical = schema.get("$schema", "").replace("https://json-schema.org/", "http://json-schema.org/", 1)
        validator_class = validator_for({"$schema": canonical}, default=None)
    assert validator_class is not None, f"jsonschema knows no validator for $schema {schema.get('$schema')!r}"
    validator_class.check_schema(schema)

    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "docker-compose.yml breaks the Compose spec:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


# --------------------------------------------------------------------------- shape


def test_expected_services_exist(services: dict) -> None:
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_datastores_publish_nothing_and_sit_only_on_the_internal_network(compose: dict, services: dict) -> None:
    for name in DATASTORES:
        service = services[name]
        assert not service.get("ports"), f"{name} publishes {service['ports']}; it must stay inside the stack"
        assert service.get("network_mode") is None, f"{name} sets network_mode; it must use the internal network"
        networks = network_names(service)
        assert networks == {"internal"}, f"{name} is on {sorted(networks)}, expected only ['internal']"
    assert compose["networks"]["internal"].get("internal") is True, "network 'internal' needs internal: true"


def test_services_that_publish_ports_have_a_route_out(compose: dict, services: dict) -> None:
    # Docker cannot publish a port of a container that is only on internal networks.
    publishing = {name for name, svc in services.items() if svc.get("ports")}
    assert {"api", "mlflow"} <= publishing, f"api and mlflow must publish their ports; publishing: {sorted(publishing)}"
    for name in publishing:
        routed = [n for n in network_names(services[name]) if not (compose["networks"].get(n) or {}).get("internal")]
        assert routed, f"{name} publishes ports but is only on internal networks"


def test_worker_reserves_one_nvidia_gpu_and_runs_one_job_per_process(services: dict) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpus, f"worker reserves no nvidia GPU: {devices}"
    assert gpus[0].get("count") == 1, f"worker should reserve exactly one GPU, got count={gpus[0].get('count')!r}"
    assert environment_of(worker).get("CUDA_VISIBLE_DEVICES") == "0"

    argv = command_of(worker)
    assert option_value(argv, "--concurrency", "-c") == "1", "one job per GPU"
    assert option_value(argv, "--pool", "-P") == "prefork", "time limits and a fresh process per job need prefork"
    assert option_value(argv, "--max-tasks-per-child") == "1", "a fresh process per job frees GPU memory"


def test_every_healthcheck_has_a_test_and_every_healthy_dependency_a_healthcheck(services: dict) -> None:
    checked = {
        name for name, svc in services.items() if svc.get("healthcheck") and not svc["healthcheck"].get("disable")
    }
    assert {"postgres", "redis", "mlflow", "api"} <= checked, f"services with a healthcheck: {sorted(checked)}"
    for name in checked:
        test = services[name]["healthcheck"].get("test")
        assert test and test not in (["NONE"], "NONE"), f"{name}'s healthcheck has no test"
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}'s healthcheck test is malformed: {test}"

    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        if isinstance(depends, dict):
            for dependency, rule in depends.items():
                if rule.get("condition") == "service_healthy":
                    assert dependency in checked, f"{name} waits for {dependency} to be healthy; it has no healthcheck"


def test_api_and_worker_start_after_migrations(services: dict) -> None:
    assert services["migrate"].get("restart") == "no", "migrate is one-shot"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["mlflow"]["condition"] == "service_healthy", name


def test_volumes_and_networks_used_are_declared(compose: dict, services: dict) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {})
    named_used = set()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":", 1)[0] if ":" in volume else ""
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            else:
                source, kind = volume.get("source", ""), volume["type"]
            if kind == "volume" and source:
                named_used.add(source)
                assert source in declared_volumes, f"{name} uses volume {source!r}, not declared under volumes:"
            elif kind == "bind":
                assert (REPO_ROOT / source).exists(), f"{name} bind-mounts {source}, which does not exist"
        if svc.get("networks") is not None:
            undeclared = network_names(svc) - declared_networks
            assert not undeclared, f"{name} joins undeclared networks {sorted(undeclared)}"
    expected = {"postgres-data", "redis-data", "mlflow-artifacts"}
    assert expected <= named_used, f"named volumes in use: {sorted(named_used)}, expected at least {sorted(expected)}"


def test_only_the_api_and_the_mlflow_ui_are_published_beyond_the_host(services: dict) -> None:
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            if not spec.startswith("127.0.0.1:"):  # a loopback port is for the operator's own ssh tunnel
                published.setdefault(name, []).append(spec)
    assert set(published) == {"api", "mlflow"}, f"published beyond loopback: {published}"


def test_the_mlflow_ui_asks_for_a_login_and_descent_logs_in(services: dict) -> None:
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in command_of(mlflow), "MLflow must run its basic-auth app"
    env = environment_of(mlflow)
    config = REPO_ROOT / env["MLFLOW_AUTH_CONFIG_PATH"].removeprefix("/app/")
    assert config.is_file(), f"{config} is missing"
    assert "admin_password" not in config.read_text().replace("# ", "")  # the password comes from .env only
    for variable in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", env[variable]), f"{variable} must be required from .env"
    for name in ("api", "worker", "reaper", "migrate", "flower"):
        client_env = environment_of(services[name])
        assert client_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"], name
        assert client_env["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"], name


def test_no_secret_is_committed(services: dict) -> None:
    password = environment_of(services["postgres"])["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", password), (
        f"POSTGRES_PASSWORD must be required from the environment (${{POSTGRES_PASSWORD:?...}}), got {password!r}"
    )
    urls_checked = 0
    for name, svc in services.items():
        for text in [*environment_of(svc).values(), *(command_of(svc) if svc.get("command") else [])]:
            for url in re.findall(r"[a-z][\w+.-]*://\S+", interpolated(text, unset="INTERPOLATED")):
                urls_checked += 1
                assert urlsplit(url).password in (None, "INTERPOLATED"), f"{name} embeds a literal password: {text}"
    assert urls_checked, "no connection URL found to check"


def test_env_example_lists_every_variable_compose_reads() -> None:
    env_example = REPO_ROOT / ".env.example"
    assert env_example.is_file(), ".env.example is missing"
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", env_example.read_text(), re.MULTILINE))
    used = {m.group(1) for path in (COMPOSE_FILE, *OVERRIDES.values()) for m in INTERPOLATION.finditer(path.read_text())}
    assert {"POSTGRES_PASSWORD", "MLFLOW_UI_URL"} <= used
    missing = used - listed
    assert not missing, f".env.example does not mention {sorted(missing)}"


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("name", ["migrate", "api", "worker", "reaper", "flower"])
def test_app_services_share_the_descent_environment(services: dict, name: str) -> None:
    env = environment_of(services[name])
    expected = {
        "DATABASE_URL": ("postgresql+psycopg", "postgres", 5432),
        "BROKER_URL": ("redis", "redis", 6379),
        "MLFLOW_TRACKING_URI": ("http", "mlflow", 5000),
    }
    for key, (scheme, host, port) in expected.items():
        assert key in env, f"{name} lacks {key}"
        url = urlsplit(interpolated(env[key]))
        assert (url.scheme, url.hostname, url.port) == (scheme, host, port), f"{name}.{key} = {env[key]}"
        assert network_names(services[name]) & network_names(services[host]), f"{name} shares no network with {host}"
    assert "MLFLOW_UI_URL" in env, f"{name} lacks MLFLOW_UI_URL"


def test_mlflow_store_database_is_created_by_the_postgres_init_script(services: dict) -> None:
    argv = command_of(services["mlflow"])
    assert argv[:2] == ["mlflow", "server"]
    store = urlsplit(interpolated(option_value(argv, "--backend-store-uri")))
    assert (store.scheme, store.hostname, store.port) == ("postgresql+psycopg", "postgres", 5432)
    database = store.path.lstrip("/")
    # The volume mounted there, or (deploy/compose.minio.yml) a bucket of the stack's MinIO.
    assert option_value(argv, "--artifacts-destination") in ("/mlartifacts", "s3://descent-artifacts/mlartifacts")

    init_dir = REPO_ROOT / "deploy" / "postgres-init"
    scripts = " ".join(p.read_text() for p in sorted(init_dir.glob("*.s[qh]*")))  # .sql and .sh
    # Literally, or (the shell script) through a psql variable whose default is that name.
    literal = re.search(rf"CREATE\s+DATABASE\s+{re.escape(database)}\s*;", scripts, re.IGNORECASE)
    variable = re.search(r'CREATE\s+DATABASE\s+:"mlflow_db"', scripts) and f"mlflow_db=\"${{MLFLOW_DB:-{database}}}\"" in scripts
    assert literal or variable, f"no script in {init_dir} creates database {database!r}"
    volumes = services["postgres"].get("volumes", [])
    mounts = [v for v in volumes if isinstance(v, str) and "docker-entrypoint-initdb.d" in v]
    assert mounts and mounts[0].startswith("./deploy/postgres-init:"), "postgres does not mount deploy/postgres-init"


def test_mlflow_accepts_the_host_name_the_stack_reaches_it_by(services: dict) -> None:
    # MLflow >= 3.5 answers 403 to a Host header outside its allow-list (default: localhost
    # and private IPs), and /health is exempt, so the healthcheck would not catch it.
    allowed = interpolated(environment_of(services["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"]).split(",")
    for name in ("api", "worker"):
        host = urlsplit(interpolated(environment_of(services[name])["MLFLOW_TRACKING_URI"])).netloc
        assert any(fnmatch.fnmatch(host, pattern.strip()) for pattern in allowed), (
            f"{name} reaches MLflow as {host!r}, which MLFLOW_SERVER_ALLOWED_HOSTS={allowed} refuses"
        )


# --------------------------------------------------------------------------- commands -> code


def test_project_image_services_run_known_commands(services: dict) -> None:
    project = {name: svc for name, svc in services.items() if "build" in svc}
    assert set(project) >= {"mlflow", "migrate", "api", "worker", "reaper", "flower"}
    for name, svc in project.items():
        program = command_of(svc)[0]
        assert program in PROJECT_COMMANDS, f"{name} runs {program!r}, which no test here resolves to code"


def test_uvicorn_app_points_at_a_defined_attribute(services: dict) -> None:
    for name, argv in services_running(services, "uvicorn").items():
        target = next((arg for arg in argv[1:] if not arg.startswith("-") and ":" in arg), None)
        assert target, f"{name}: no module:attribute in {argv}"
        module, attribute = target.split(":", 1)
        source = module_file(module).read_text()
        assert defines_top_level(source, attribute), f"{name}: {module_file(module)} does not define {attribute!r}"


def test_celery_app_module_defines_the_app(services: dict) -> None:
    for name, argv in services_running(services, "celery").items():
        module = option_value(argv, "-A", "--app")
        path = module_file(module.split(":", 1)[0])
        source = path.read_text()
        attributes = [module.split(":", 1)[1]] if ":" in module else ["celery_app", "app"]
        assert any(defines_top_level(source, a) for a in attributes), f"{name}: {path} defines none of {attributes}"


def test_python_modules_exist_and_run_as_main(services: dict) -> None:
    running = services_running(services, "python")
    assert running, "no service runs `python -m ...` (the reaper should)"
    for name, argv in running.items():
        assert argv[1] == "-m", f"{name}: expected `python -m MODULE`, got {argv}"
        source = module_file(argv[2]).read_text()
        assert 'if __name__ == "__main__":' in source, f"{name}: {argv[2]} has no __main__ entry point"


def test_alembic_points_at_the_migrations_folder(services: dict) -> None:
    assert services_running(services, "alembic") == {"migrate": ["alembic", "upgrade", "head"]}
    ini = REPO_ROOT / "alembic.ini"
    assert ini.is_file(), f"{ini} is missing"
    assert re.search(r"^script_location\s*=\s*(%\(here\)s/)?migrations\s*$", ini.read_text(), re.MULTILINE), (
        "alembic.ini must say script_location = migrations"
    )
    assert (REPO_ROOT / "migrations" / "env.py").is_file(), "migrations/env.py is missing"


def test_image_contains_what_the_commands_run() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+\s*$", dockerfile, re.MULTILINE))
    sources = {src.rstrip("/") for line in copied for src in line.split()}
    for needed in ("api", "worker", "trainer", "jobs", "launcher", "migrations", "alembic.ini", "pyproject.toml"):
        assert needed in sources, f"the Dockerfile does not COPY {needed}"
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"


def test_the_worker_serves_its_metrics_on_the_internal_network_only(services: dict) -> None:
    worker = services["worker"]
    port = environment_of(worker).get("WORKER_METRICS_PORT")
    assert port and int(port) > 0, "the worker's Prometheus /metrics should be on"
    assert [str(p) for p in worker.get("expose", [])] == [port], "expose the metrics port to the stack's network"
    assert not worker.get("ports"), "the worker publishes nothing on the host"
    scrape = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {c["job_name"]: c for c in scrape["scrape_configs"]}
    assert targets["descent-workers"]["dns_sd_configs"][0]["port"] == int(port)
    assert targets["descent-api"]["static_configs"][0]["targets"] == ["api:8000"]


def test_the_workers_read_the_dataset_cache_that_fetch_datasets_fills(services: dict) -> None:
    def cache_volume(name: str) -> str:
        directory = environment_of(services[name])["DATASETS_DIR"]
        mounted = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == directory]
        assert mounted, f"{name}: nothing is mounted at DATASETS_DIR={directory}"
        return mounted[0]

    assert cache_volume("worker") == cache_volume("fetch-datasets") == "datasets"
    # The workers have no route out: they do not try to download; fetch-datasets does.
    assert environment_of(services["worker"])["DATASETS_DOWNLOAD"] == "false"
    assert command_of(services["fetch-datasets"])[:4] == ["python", "-m", "api.admin", "fetch-datasets"]
    assert "public" in network_names(services["fetch-datasets"])


def test_two_worker_services_serve_two_device_pools_one_with_the_gpu(services: dict) -> None:
    workers = {name: s for name, s in services.items()
               if s.get("command") and command_of(s)[:4] == ["celery", "-A", "worker.app", "worker"]}  # fmt: skip
    pools = {name: environment_of(s).get("WORKER_POOL") for name, s in workers.items()}
    assert sorted(pools.values()) == ["cpu", "gpu"], pools
    gpu_reserved = {
        name for name, s in workers.items()
        if any(d.get("driver") == "nvidia" for d in s.get("deploy", {}).get("resources", {}).get("reservations", {})
               .get("devices", []))
    }  # fmt: skip
    assert {pools[name] for name in gpu_reserved} == {"gpu"}, "only the gpu pool's worker reserves a GPU"
    for name, service in workers.items():
        assert "-Q" not in command_of(service), f"{name}: its pool's queue comes from WORKER_POOL, not -Q"


# --------------------------------------------------------------------------- MinIO as the store


def test_the_minio_override_validates_on_its_own() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    canonical = schema.get("$schema", "").replace("https://json-schema.org/", "http://json-schema.org/", 1)
    validator_class = validator_for(schema, default=None) or validator_for({"$schema": canonical})
    errors = list(validator_class(schema).iter_errors(yaml.safe_load(MINIO_OVERRIDE.read_text())))
    assert not errors, [e.message for e in errors]


def test_with_minio_mlflow_stores_in_the_bucket_minio_bucket_makes_and_changes_nothing_else() -> None:
    base = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    stack = merged({"services": base}, yaml.safe_load(MINIO_OVERRIDE.read_text()))["services"]
    before, after = command_of(base["mlflow"]), command_of(stack["mlflow"])
    destination = option_value(after, "--artifacts-destination")
    assert destination.startswith("s3://"), destination
    # The override repeats the base command: the two must not drift apart but for the destination.
    strip = [arg for arg in before if not arg.startswith("--artifacts-destination")]
    assert [arg for arg in after if not arg.startswith("--artifacts-destination")] == strip
    bucket = urlsplit(destination).netloc
    assert f"store/{bucket}" in " ".join(command_of(stack["minio-bucket"])), "minio-bucket makes another bucket"

    env = environment_of(stack["mlflow"])
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    # MLflow stores as its own MinIO user, not as MinIO's root; nobody else gets store credentials.
    assert "MLFLOW_S3_ACCESS_KEY" in env["AWS_ACCESS_KEY_ID"] and "MINIO_ROOT" not in env["AWS_ACCESS_KEY_ID"]
    for name, service in stack.items():
        if name not in ("mlflow", "minio", "minio-bucket", "preflight"):  # preflight has no network
            assert not {"AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD"} & set(environment_of(service)), name
    assert stack["mlflow"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    for name in ("minio", "minio-bucket"):
        assert not stack[name].get("ports") and network_names(stack[name]) == {"internal"}, name


def test_preflight_refuses_example_minio_secrets_only_where_the_override_passes_them() -> None:
    from launcher.preflight import problems

    good = {"POSTGRES_PASSWORD": "p" * 12 + "1", "DESCENT_DB_PASSWORD": "d" * 12 + "2",
            "MLFLOW_TRACKING_PASSWORD": "m" * 13, "MLFLOW_FLASK_SERVER_SECRET_KEY": "f" * 13}  # fmt: skip
    assert problems(good) == []
    found = problems({**good, "MINIO_ROOT_PASSWORD": "change-me", "MLFLOW_S3_SECRET_KEY": ""})
    assert any(p.startswith("MINIO_ROOT_PASSWORD is the example value") for p in found), found
    assert "MLFLOW_S3_SECRET_KEY is not set" in found
    passed = yaml.safe_load(MINIO_OVERRIDE.read_text())["services"]["preflight"]["environment"]
    assert set(passed) == {"MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY"}


def test_mlflow_checks_a_login_once_a_minute_not_at_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without MLflow's credential cache, every request of the worker, the API and a browser
    # pays a scrypt hash check (~150 ms of the MLflow server's CPU): ~3 s a short job.
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(REPO_ROOT / "deploy" / "mlflow-auth.ini"))
    assert 0 < read_auth_config().auth_cache_ttl_seconds <= 60
