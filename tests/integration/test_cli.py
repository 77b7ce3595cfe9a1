"""The `descent` command as a person uses it: the installed executable, run as a
subprocess against the real stack (API, Redis events, workers, MLflow), with the
server and key given through DESCENT_URL / DESCENT_API_KEY."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ADMIN_KEY, Stack

DESCENT = Path(sys.executable).parent / "descent"
SMALL = {"name": "cli-iris", "dataset": {"name": "iris"}, "epochs": 5, "batch_size": 16}
LONG = {"name": "cli-long", "dataset": {"name": "digits"}, "epochs": 200}


def descent(stack: Stack, *args: str, key: str = ADMIN_KEY, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "DESCENT_URL": f"http://127.0.0.1:{stack.settings.api_port}",
        "DESCENT_API_KEY": key,
        "XDG_CONFIG_HOME": "/nonexistent",  # no one's own config file
    }
    env.pop("COLUMNS", None)
    return subprocess.run([str(DESCENT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def write_spec(tmp_path: Path, spec: dict, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec) if name.endswith(".json") else "\n".join(_yaml_lines(spec)) + "\n")
    return path


def _yaml_lines(spec: dict) -> list[str]:  # a spec file as a person writes it
    return [f"{key}: {json.dumps(value)}" for key, value in spec.items()]


@pytest.fixture(scope="module")
def finished(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], str]:
    spec_file = write_spec(tmp_path_factory.mktemp("cli"), SMALL)
    result = descent(stack, "submit", str(spec_file), "--watch")
    found = re.search(r"submitted job ([0-9a-f-]{36})", result.stdout)
    assert found, result
    return result, found.group(1)


def test_submit_watch_shows_progress_eta_and_the_final_state(finished) -> None:
    result, job_id = finished
    assert result.returncode == 0, result
    out = result.stdout
    assert re.search(r"\[#+-*\]\s+\d+\.\d%\s+step \d+/\d+", out), out  # the progress bar, as text in a pipe
    assert "ETA " in out and "train_loss" in out
    assert re.search(r"queued -> running|: running", out), out  # state changes are lines
    assert out.rstrip().splitlines()[-1].startswith("succeeded"), out


def test_show_jobs_and_metrics_answer_json_for_scripts(stack: Stack, finished) -> None:
    _, job_id = finished
    shown = descent(stack, "show", job_id, "--output", "json")
    assert shown.returncode == 0, shown
    job = json.loads(shown.stdout)
    assert (job["id"], job["status"], job["spec"]["dataset"]["name"]) == (job_id, "succeeded", "iris")

    listed = descent(stack, "jobs", "--output", "json", "--status", "succeeded", "--limit", "50")
    assert listed.returncode == 0, listed
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]

    rows = json.loads(descent(stack, "metrics", job_id, "--output", "json").stdout)
    assert {"metric", "step", "value"} == set(rows[0])
    train_loss = [r for r in rows if r["metric"] == "train_loss"]
    assert [r["step"] for r in train_loss] == list(range(job["progress"]["total_steps"]))

    table = descent(stack, "metrics", job_id, "--metric", "val_accuracy")
    assert table.returncode == 0 and "val_accuracy" in table.stdout and "train_loss" not in table.stdout, table
    chart = descent(stack, "metrics", job_id, "--metric", "train_loss", "--plot")
    assert chart.returncode == 0 and "train_loss" in chart.stdout, chart
    human = descent(stack, "show", job_id)
    assert human.returncode == 0 and job_id in human.stdout and "succeeded" in human.stdout, human


def test_a_cancelled_job_is_watched_to_exit_code_2(stack: Stack, tmp_path: Path) -> None:
    submitted = descent(stack, "submit", str(write_spec(tmp_path, LONG, "long.json")), "--output", "json")
    assert submitted.returncode == 0, submitted
    job_id = json.loads(submitted.stdout)["id"]
    stack.wait(job_id, until={"running"}, timeout_s=60)

    cancelled = descent(stack, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled
    assert re.search(rf"job {job_id}: (cancelling|cancelled)", cancelled.stdout), cancelled

    watched = descent(stack, "watch", job_id)
    assert watched.returncode == 2, watched
    assert watched.stdout.rstrip().splitlines()[-1].startswith("cancelled"), watched.stdout

    again = descent(stack, "cancel", job_id)  # it has ended: the API's 409, a usage error
    assert again.returncode == 3 and "already ended" in again.stderr, again


def test_a_bad_spec_exits_3_naming_the_field(stack: Stack, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SMALL | {"optimizer": {"name": "adam", "lr": -1}})
    result = descent(stack, "submit", str(spec), "--watch")
    assert result.returncode == 3, result
    assert "optimizer.lr" in result.stderr and "greater than 0" in result.stderr, result.stderr


def test_a_wrong_api_key_exits_4(stack: Stack) -> None:
    result = descent(stack, "jobs", key="dsk_not-a-key")
    assert result.returncode == 4, result
    assert "not valid" in result.stderr and "DESCENT_API_KEY" in result.stderr
    assert descent(stack, "--api-key", "dsk_also-wrong", "catalog").returncode == 4


def test_the_catalog_lists_what_can_be_trained(stack: Stack) -> None:
    result = descent(stack, "catalog", "--output", "json")
    assert result.returncode == 0, result
    assert "adam" in [o["name"] for o in json.loads(result.stdout)["optimizers"]]
    assert "warmup_cosine" in descent(stack, "catalog").stdout


def test_submitting_twice_with_an_idempotency_key_gives_the_same_job(stack: Stack, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SMALL | {"name": "cli-idempotent"})
    key = f"cli-retry-{tmp_path.name}"
    first = descent(stack, "submit", str(spec), "--idempotency-key", key, "--output", "json")
    again = descent(stack, "submit", str(spec), "--idempotency-key", key, "--output", "json")
    assert first.returncode == 0 and again.returncode == 0, (first, again)
    assert json.loads(again.stdout)["id"] == json.loads(first.stdout)["id"]
    plain = descent(stack, "submit", str(spec), "--idempotency-key", key)  # the table output says the same
    assert json.loads(first.stdout)["id"] in plain.stdout
    assert descent(stack, "submit", str(spec), "--output", "json").returncode == 0  # without a key: a new job
    named = [j for j in json.loads(descent(stack, "jobs", "--limit", "100", "--output", "json").stdout)
             if j["name"] == "cli-idempotent"]  # fmt: skip
    assert len(named) == 2

    other = write_spec(tmp_path, SMALL | {"name": "cli-idempotent", "epochs": 6}, name="other.yaml")
    conflict = descent(stack, "submit", str(other), "--idempotency-key", key)  # same key, another spec
    assert conflict.returncode == 3, conflict
    assert "Idempotency-Key" in conflict.stderr or "idempotency" in conflict.stderr.lower(), conflict.stderr


def test_metrics_shows_the_training_and_leaves_system_metrics_to_those_who_ask(stack: Stack, finished) -> None:
    _, job_id = finished
    rows = json.loads(descent(stack, "metrics", job_id, "--output", "json").stdout)
    assert "system/cpu_utilization_percentage" in {r["metric"] for r in rows}  # every run has them
    table = descent(stack, "metrics", job_id)
    assert table.returncode == 0 and "train_loss" in table.stdout and "system/" not in table.stdout, table
    assert "system metrics not shown" in table.stderr
    cpu = descent(stack, "metrics", job_id, "--metric", "system/cpu_utilization_percentage", "--output", "json")
    assert cpu.returncode == 0, cpu
    assert {r["metric"] for r in json.loads(cpu.stdout)} == {"system/cpu_utilization_percentage"}
