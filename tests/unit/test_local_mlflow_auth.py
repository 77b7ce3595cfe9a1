"""`make up` with MLFLOW_AUTH_ENABLED=true runs MLflow's basic-auth app as docker-compose
does (deploy/mlflow-auth.ini), not with the file MLflow ships (every login reads every
experiment, its admin's password is `password1234`, a hash check at every request)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.server.auth.config import read_auth_config

from jobs.settings import Settings
from launcher.processes import mlflow_command
from launcher.stack import stack_env


def mlflow_reads(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The auth config the MLflow server started with `env` reads (MLflow's own reader)."""
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", env["MLFLOW_AUTH_CONFIG_PATH"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    return read_auth_config()


def test_make_up_with_mlflow_auth_runs_it_as_compose_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_AUTH_CONFIG_PATH", raising=False)
    settings = Settings(descent_home=tmp_path / "home", mlflow_auth_enabled=True)
    assert "basic-auth" in mlflow_command(settings)
    config = mlflow_reads(stack_env(settings), monkeypatch)
    assert config.default_permission == "NO_PERMISSIONS"  # a project's login reads its own work only
    assert config.admin_password is None  # from MLFLOW_AUTH_ADMIN_PASSWORD, never from a file
    assert 0 < config.auth_cache_ttl_seconds <= 60
    assert config.database_uri == f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow-auth.db'}"  # its users stay in DESCENT_HOME


def test_an_operators_own_mlflow_auth_config_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "own.ini"
    own.write_text("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///own.db\n")
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(own))
    env = stack_env(Settings(descent_home=tmp_path / "home", mlflow_auth_enabled=True))
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(own)
    assert not (tmp_path / "home" / "mlflow-auth.ini").exists()


def test_without_mlflow_auth_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_AUTH_CONFIG_PATH", raising=False)
    env = stack_env(Settings(descent_home=tmp_path / "home"))
    assert "MLFLOW_AUTH_CONFIG_PATH" not in env
    assert not (tmp_path / "home" / "mlflow-auth.ini").exists()
