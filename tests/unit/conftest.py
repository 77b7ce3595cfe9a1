"""Unit-test environment: a throw-away SQLite database and SQLite Celery broker.

`jobs.settings` builds its `settings` singleton at import and `jobs.db` /
`jobs.queue` cache their engine and Celery app, so the environment is set here,
at conftest import, before any test module imports `jobs`, `api` or `worker`.
The schema is created the way production creates it: by running Alembic.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

UNIT_HOME = Path(tempfile.mkdtemp(prefix="descent-unit-"))
UNIT_ENV = {
    "DESCENT_HOME": str(UNIT_HOME),
    "DATABASE_URL": f"sqlite:///{UNIT_HOME}/t.db",
    "BROKER_URL": f"sqla+sqlite:///{UNIT_HOME}/broker.db",
    "QUEUE_NAME": "unit-test",
    "DESCENT_BOOTSTRAP_KEY": "unit-admin-4f1c9e7a2b6d8053e1a7c4f92d6b0e38",  # a server-admin key
    # Every test client is one address ("testclient"), and many tests send bad keys on purpose.
    "AUTH_FAILURE_LIMIT": "1000000",
    # The suite's jobs are never run: the default project piles up thousands of queued jobs
    # and running studies. Tests of the quotas set them per project (tests/unit/test_quotas.py).
    "MAX_ACTIVE_JOBS_PER_PROJECT": "1000000",
    "MAX_STUDY_PARALLELISM_PER_PROJECT": "1000000",
}
ADMIN_HEADERS = {"Authorization": "Bearer unit-admin-4f1c9e7a2b6d8053e1a7c4f92d6b0e38"}
os.environ.update(UNIT_ENV)

import pytest  # noqa: E402
import torch  # noqa: E402


def _migrate() -> None:
    from alembic import command
    from alembic.config import Config

    # No ini file: alembic.ini's logging section would reconfigure pytest's loggers.
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = UNIT_ENV["DATABASE_URL"]
    command.upgrade(config, "head")


@pytest.fixture(scope="session")
def unit_env() -> dict[str, str]:
    """The environment variables the unit suite runs under (for subprocesses)."""
    return dict(UNIT_ENV)


@pytest.fixture(scope="session")
def migrated_db() -> str:
    """The unit database, migrated to head once per session; returns its URL."""
    from jobs.settings import settings

    # Guard against a module imported before this conftest: the singleton must point here.
    assert settings.database_url == UNIT_ENV["DATABASE_URL"], settings.database_url
    assert settings.broker_url == UNIT_ENV["BROKER_URL"], settings.broker_url
    _migrate()
    return UNIT_ENV["DATABASE_URL"]


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    shutil.rmtree(UNIT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def client(migrated_db: str) -> Iterator:
    """The API in-process, called with the bootstrap admin key (a key of the default project)."""
    from fastapi.testclient import TestClient

    from api.main import app

    with TestClient(app, raise_server_exceptions=False, headers=ADMIN_HEADERS) as test_client:
        yield test_client


# Samples (train, test) of the image sets written for the unit tests: small, and cifar100's
# large enough that a stratified hold-out can hold every one of its 100 classes.
IMAGE_CACHE_SIZES = {
    "mnist": (300, 100),
    "fashion_mnist": (300, 100),
    "kmnist": (300, 100),
    "cifar10": (300, 100),
    "cifar100": (600, 200),
}


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset cache (DATASETS_DIR) holding every image set, small, in the real file formats."""
    from tests.dataset_files import write_image_set

    root = tmp_path_factory.mktemp("datasets")
    for name, (n_train, n_test) in IMAGE_CACHE_SIZES.items():
        write_image_set(root, name, n_train=n_train, n_test=n_test, seed=len(name))
    return root


@pytest.fixture
def image_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image sets' spec classes sized as the test cache's files, so that a spec's
    split_sizes are the sizes the trainer must produce from them."""
    from jobs.spec import DATASETS, ImageDataset

    for name, (n_train, n_test) in IMAGE_CACHE_SIZES.items():
        cls = DATASETS[name]
        assert issubclass(cls, ImageDataset)
        monkeypatch.setattr(cls, "TRAIN", n_train)
        monkeypatch.setattr(cls, "TEST", n_test)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small models on a CPU shared with other test runs: a second thread mostly waits on the first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
