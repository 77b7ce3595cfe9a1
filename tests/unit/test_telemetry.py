"""MLflow 3 reports usage to its makers from every process that imports it. A self-hosted
Descent does not: `make up`'s processes and the compose image turn it off, unless the
operator's environment says otherwise."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.settings import Settings
from launcher.stack import stack_env

REPO_ROOT = Path(__file__).resolve().parents[2]
ASK_MLFLOW = "from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"


def outside_ci(env: dict[str, str]) -> dict[str, str]:
    """`env` without the variables by which MLflow tells a CI run or a test (it sends nothing
    there): what a user's machine has."""
    from mlflow.telemetry import utils

    names = set(re.findall(r'"([A-Z_]+)"', inspect.getsource(utils._is_ci_env_or_testing)))
    assert "CI" in names and "PYTEST_CURRENT_TEST" in names  # (MLflow still tells them this way)
    return {name: value for name, value in env.items() if name not in names}


def mlflow_sends_telemetry(env: dict[str, str]) -> bool:
    answer = subprocess.run([sys.executable, "-c", ASK_MLFLOW], env=env, capture_output=True, text=True, check=True)
    return answer.stdout.strip() == "False"


def test_the_stacks_processes_send_mlflow_no_telemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    env = outside_ci(stack_env(Settings(descent_home=tmp_path / "home")))
    assert not mlflow_sends_telemetry(env)
    env.pop("MLFLOW_DISABLE_TELEMETRY")
    assert mlflow_sends_telemetry(env)  # (what each process would do otherwise)


def test_an_operator_may_turn_it_back_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    assert stack_env(Settings(descent_home=tmp_path / "home"))["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_the_image_turns_it_off_for_every_service() -> None:
    """One image runs the API, the workers, the reaper and the MLflow server (docker-compose.yml)."""
    instructions = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    env_lines = [line for line in instructions.splitlines() if line.startswith("ENV ")]
    assert any(re.search(r"\bMLFLOW_DISABLE_TELEMETRY=true\b", line) for line in env_lines)
