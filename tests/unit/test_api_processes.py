"""API_WORKERS: how many API processes `make up`, `make api` and compose start."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from jobs.settings import API_WORKERS_DEFAULT_MAX, Settings
from launcher.processes import api_command
from launcher.stack import stack_env


def workers_argument(command: list[str]) -> str | None:
    return command[command.index("--workers") + 1] if "--workers" in command else None


def test_the_default_is_one_process_per_core_up_to_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("API_WORKERS", raising=False)
    for cores, expected in ((1, 1), (2, 2), (4, 4), (64, API_WORKERS_DEFAULT_MAX)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert Settings().api_workers == expected


def test_several_workers_share_the_port_and_one_runs_in_process() -> None:
    assert workers_argument(api_command(Settings(api_workers=3))) == "3"
    assert workers_argument(api_command(Settings(api_workers=1))) is None  # no supervisor process for one
    assert stack_env(Settings(api_workers=3))["API_WORKERS"] == "3"  # what `make up`'s children read


def test_the_setting_comes_from_the_environment_and_is_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_WORKERS", "3")
    assert Settings().api_workers == 3
    with pytest.raises(ValidationError, match="api_workers"):
        Settings(api_workers=0)
