"""`python -m launcher.preflight`: refuse to start a deployment whose secrets are examples.

docker-compose.yml runs it first (PostgreSQL, and so everything else, waits for it to
succeed): `cp .env.example .env` without editing it must not bring up a stack whose
database and MLflow passwords are printed in this repository. Each secret must be set,
must not be a value the documentation shows, and must be long enough; the two
PostgreSQL passwords must differ (the services' role is not the superuser). An empty
DESCENT_BOOTSTRAP_KEY is allowed (no bootstrap key); a set one must be random enough.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from jobs.settings import EXAMPLE_SECRETS, bootstrap_key_problem

MIN_LENGTH = 12  # MLflow's own minimum for its admin password; `openssl rand -hex 24` gives 48
SECRETS = (
    "POSTGRES_PASSWORD",  # PostgreSQL's superuser: only the postgres service has it
    "DESCENT_DB_PASSWORD",  # the services' own role
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
# Checked when set: deploy/compose.minio.yml passes them (MinIO as the artifact store).
OPTIONAL_SECRETS = ("MINIO_ROOT_PASSWORD", "MLFLOW_S3_SECRET_KEY")


def problems(env: Mapping[str, str]) -> list[str]:
    """What is wrong with these settings, one sentence each; empty when they may start."""
    found = []
    for name in SECRETS + tuple(name for name in OPTIONAL_SECRETS if name in env):
        value = env.get(name, "")
        if not value:
            found.append(f"{name} is not set")
        elif value.lower() in EXAMPLE_SECRETS:
            found.append(f"{name} is the example value from .env.example; set your own (e.g. `openssl rand -hex 24`)")
        elif len(value) < MIN_LENGTH:
            found.append(f"{name} is shorter than {MIN_LENGTH} characters")
    if env.get("POSTGRES_PASSWORD") and env.get("POSTGRES_PASSWORD") == env.get("DESCENT_DB_PASSWORD"):
        found.append("DESCENT_DB_PASSWORD must differ from POSTGRES_PASSWORD (the superuser's)")
    bootstrap = env.get("DESCENT_BOOTSTRAP_KEY", "")
    if bootstrap and (problem := bootstrap_key_problem(bootstrap)):
        found.append(f"DESCENT_BOOTSTRAP_KEY {problem}")
    return found


def main() -> int:
    found = problems(os.environ)
    for problem in found:
        print(f"refusing to start: {problem}", file=sys.stderr)
    if found:
        print("edit .env (see .env.example), then `docker compose up -d` again", file=sys.stderr)
        return 1
    print("preflight: the secrets are set and none is an example value")
    return 0


if __name__ == "__main__":
    sys.exit(main())
