"""Key administration from a shell on the server, for when there is no admin key yet
(or it was lost): `python -m api.admin create-key --project default --server-admin`; a
project's MLflow login, made or reset: `python -m api.admin mlflow-login PROJECT`; and the
dataset cache filled ahead: `python -m api.admin fetch-datasets mnist cifar10`.

Talks to the database the settings point at (DATABASE_URL), like the API does.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from mlflow.exceptions import MlflowException

from jobs import access, mlflow_tenancy
from jobs.db import session_scope
from jobs.spec import DATASETS, ImageDataset

IMAGE_SET_NAMES = [name for name, spec in DATASETS.items() if issubclass(spec, ImageDataset)]


def _print_login(login: mlflow_tenancy.MlflowLogin) -> None:
    print(f"MLflow login of project {login.username.removeprefix(mlflow_tenancy.USERNAME_PREFIX)} "
          "(shown once; MLflow keeps only its hash):", file=sys.stderr)  # fmt: skip
    print(f"{login.username} {login.password}")


def create_project(args: argparse.Namespace) -> int:
    with session_scope() as session:
        access.create_project(session=session, name=args.name)
        login = mlflow_tenancy.create_login(args.name)  # before the commit: no project without its login
    print(f"project {args.name} created", file=sys.stderr if login else sys.stdout)
    if login:
        _print_login(login)
    return 0


def mlflow_login(args: argparse.Namespace) -> int:
    """Make the project's MLflow user, or give it a new password, and share with it every
    name Descent made for the project (for projects made before MLflow's auth app ran)."""
    with session_scope() as session:
        if not access.project_exists(session=session, name=args.project):
            raise access.UnknownProject(f"project {args.project!r} does not exist")
        login = mlflow_tenancy.create_login(args.project)
        if login is None:
            print("error: MLFLOW_AUTH_ENABLED is off: MLflow has no users to make", file=sys.stderr)
            return 2
        shared = mlflow_tenancy.grant_recorded(session, args.project)
    print(f"{shared} experiments and registered models of project {args.project} shared with {login.username}",
          file=sys.stderr)  # fmt: skip
    _print_login(login)
    return 0


def create_key(args: argparse.Namespace) -> int:
    with session_scope() as session:
        if args.create_project:
            access.ensure_project(session=session, name=args.project)
        row, key = access.create_key(session=session, project=args.project, admin=args.admin,
                                     server_admin=args.server_admin, label=args.label)  # fmt: skip
        key_id = row.id
    kind = "server-admin key" if args.server_admin else "admin key" if args.admin else "key"
    print(f"{kind} {key_id} of project {args.project} (shown once; only its hash is kept):", file=sys.stderr)
    print(key)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    with session_scope() as session:
        rows = access.list_keys(session=session, project=args.project)
        print(f"{'id':<36}  {'project':<16} {'prefix':<12} {'admin':<7}  {'created':<20} {'revoked':<20} label")
        for row in rows:
            revoked = f"{row.revoked_at:%Y-%m-%d %H:%M:%S}" if row.revoked_at else "-"
            admin = "server" if row.server_admin else "project" if row.admin else "no"
            print(f"{row.id!s:<36}  {row.project:<16} {row.prefix:<12} {admin:<7}  "
                  f"{row.created_at:%Y-%m-%d %H:%M:%S}  {revoked:<20} {row.label or ''}")  # fmt: skip
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    with session_scope() as session:
        row = access.revoke_key(session=session, key_id=args.key_id)
    if row is None:
        print(f"no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"key {row.id} of project {row.project} revoked")
    return 0


def fetch_datasets(args: argparse.Namespace) -> int:
    """Fill the dataset cache ahead of the jobs (downloads on, whatever DATASETS_DOWNLOAD says
    for the workers): download each set, or verify the copy already there, or copy it --from a
    folder holding torchvision's files. Exits 1 naming the sets it could not fetch."""
    import dataclasses
    import time

    from worker.dataset_cache import DatasetCache, DatasetUnavailable  # imports torch: only for this command

    cache = dataclasses.replace(DatasetCache.from_settings(), download=True)
    failed = []
    for name in dict.fromkeys(IMAGE_SET_NAMES if "all" in args.names else args.names):
        started = time.monotonic()
        try:
            if args.source is not None:
                cache.copy_from(name, args.source)
                done = f"copied from {args.source} and verified"
            else:
                done = {"ready": "already verified", "verified": "verified (its files were there)",
                        "downloaded": "downloaded and verified"}[cache.fetch(name)]  # fmt: skip
        except DatasetUnavailable as exc:
            print(f"{name}: FAILED: {exc.reason}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{name}: {done} in {cache.root} ({time.monotonic() - started:.1f} s)")
    if failed:
        print(f"error: could not fetch {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m api.admin", description="Descent projects, API keys and the dataset cache."
    )
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("create-project", help="create a project")
    c.add_argument("name")
    c.set_defaults(run=create_project)
    c = commands.add_parser("create-key", help="create a key; prints it once, on stdout")
    c.add_argument("--project", default="default")
    c.add_argument("--admin", action="store_true", help="the key manages its own project's keys")
    c.add_argument("--server-admin", action="store_true",
                   help="the key creates projects and manages every project's keys (an admin key too)")
    c.add_argument("--label", default=None, help="what the key is for")
    c.add_argument("--create-project", action="store_true", help="create the project if it does not exist")
    c.set_defaults(run=create_key)
    c = commands.add_parser("mlflow-login", help="make or reset a project's MLflow login; prints it once")
    c.add_argument("project")
    c.set_defaults(run=mlflow_login)
    c = commands.add_parser("list-keys", help="list keys (never the keys themselves)")
    c.add_argument("--project", default=None)
    c.set_defaults(run=list_keys)
    c = commands.add_parser("revoke-key", help="revoke a key by its id")
    c.add_argument("key_id", type=uuid.UUID)
    c.set_defaults(run=revoke_key)
    c = commands.add_parser(
        "fetch-datasets", help="fill the dataset cache (DATASETS_DIR) with standard image sets, verified"
    )
    c.add_argument("names", nargs="+", choices=[*IMAGE_SET_NAMES, "all"], metavar="NAME",
                   help=f"sets to fetch: {', '.join(IMAGE_SET_NAMES)}, or all")  # fmt: skip
    c.add_argument("--from", dest="source", type=Path, default=None,
                   help="copy from this folder, laid out as torchvision's root (e.g. MNIST/raw/...), "
                   "instead of downloading")  # fmt: skip
    c.set_defaults(run=fetch_datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, LookupError, MlflowException) as exc:  # a bad or unknown project name; MLflow unreachable
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
