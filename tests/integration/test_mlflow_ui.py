"""What a person sees: a finished job's MLflow page, rendered by a real browser.

Headless Chromium opens the link the API gives for the job (`mlflow.run_url`) and the test
reads the rendered page: MLflow's model-training view (not its GenAI view of traces and
evaluation runs), the loss and val_accuracy charts, the run's source and creator. The
screenshots stay in `test-artifacts/mlflow-ui/` (CI keeps them; the README names the folder).

Skipped, with the reason, where no Chromium is installed (.ci/run installs Debian's)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import Stack

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "mlflow-ui"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's)")

JOB = {
    "name": "ui-adam-digits",
    "experiment": "ui-check",
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "model": {"arch": "mlp", "hidden": [32]},
    "optimizer": {"name": "adam", "lr": 0.003},
    "epochs": 3,
    "batch_size": 64,
    "seed": 0,
}


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless page load; `virtual-time-budget` lets the app's requests and rendering
    finish before the page is dumped or shot (compositing forced, or charts stay unrendered)."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--run-all-compositor-stages-before-draw",
             "--virtual-time-budget=20000", "--window-size=1400,1100", *args, url],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip


def rendered_text(url: str) -> str:
    dom = chromium(url, "--dump-dom").stdout
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def screenshot(url: str, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    chromium(url, f"--screenshot={path}")
    return path


def test_a_finished_jobs_mlflow_page_shows_model_training_and_its_curves(stack: Stack) -> None:
    job = stack.wait(stack.submit(JOB)["id"])
    assert job["status"] == "succeeded", job["error"]
    url = job["mlflow"]["run_url"]
    assert url, "the API gives no MLflow link for the job"

    charts = rendered_text(url)
    # The model-training view: its sidebar lists runs, models and the registry; the GenAI
    # view would list sessions, judges and "Evaluation runs".
    assert "Model registry" in charts and "Evaluation runs" not in charts, charts[:600]
    assert JOB["name"] in charts
    for metric in ("train_loss", "val_accuracy"):
        assert metric in charts, f"no {metric} chart on {url}"
    assert screenshot(url, "job-model-metrics").stat().st_size > 10_000

    overview_url = url.replace("/model-metrics?", "?")
    overview = rendered_text(overview_url)
    assert "Source descent" in overview, overview[:1500]
    assert "Created by " in overview and "No description" not in overview  # the run's note describes the job
    assert screenshot(overview_url, "job-overview").stat().st_size > 10_000
