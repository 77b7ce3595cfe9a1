"""What a person sees: a finished job's MLflow page, rendered by a real browser.

Headless Chromium opens the link the API gives for the job (`mlflow.run_url`) and the test
reads the rendered page: MLflow's model-training view (not its GenAI view of traces and
evaluation runs), the chart sections in the order they stand on the page with the loss and
val_accuracy charts, the run's source and creator (the submitting key), and the page of its
logged model with the model's metrics. The screenshots stay in `test-artifacts/mlflow-ui/`
(CI keeps them; the README names the folder).

Skipped, with the reason, where no Chromium is installed (.ci/run installs Debian's)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from jobs.tracking import MODEL_TRAINING_VIEW
from tests.integration.conftest import Stack
from tests.integration.test_mlflow_dashboard import ended, project_client, submitted

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


SECTION_OR_CHART = re.compile(
    r'data-testid="experiment-view-compare-runs-section-header".*?>([^<>]+)</div><div[^>]*>\((\d+)\)</div>'
    r'|<h4[^>]*\btitle="([^"]+)"',
    re.S,
)


class Section(NamedTuple):
    name: str
    charts: int  # how many the section holds
    rendered: list[str]  # the metrics of those drawn (MLflow draws only the sections in view)


def chart_sections(url: str) -> list[Section]:
    """The run page's chart sections top to bottom, as a person scrolls through them."""
    sections: list[Section] = []
    for match in SECTION_OR_CHART.finditer(chromium(url, "--dump-dom").stdout):
        name, charts, metric = match.groups()
        if name is not None:
            sections.append(Section(html.unescape(name), int(charts), []))
        elif sections:
            sections[-1].rendered.append(html.unescape(metric))
    return sections


def test_a_finished_jobs_mlflow_page_shows_model_training_and_its_curves(stack: Stack) -> None:
    project, tester = project_client(stack, "ui tester")
    with tester:
        job = ended(tester, f"/v1/jobs/{submitted(stack, tester, '/v1/jobs', JOB)['id']}")
    assert job["status"] == "succeeded", job["error"]
    url = job["mlflow"]["run_url"]
    assert url, "the API gives no MLflow link for the job"

    charts = rendered_text(url)
    # The model-training view: its sidebar lists runs, models and the registry; the GenAI
    # view would list sessions, judges and "Evaluation runs".
    assert "Model registry" in charts and "Evaluation runs" not in charts, charts[:600]
    assert JOB["name"] in charts
    # The page opens on the curves: one section of the job's metrics, loss and accuracy drawn.
    [section] = chart_sections(url)
    assert section.name == "Model metrics" and section.charts == 7, section  # epoch, grad_norm, lr, train/val
    assert {"train_loss", "val_accuracy"} <= set(section.rendered), section
    assert screenshot(url, "job-model-metrics").stat().st_size > 10_000

    overview_url = url.replace("/model-metrics?", "?")
    overview = rendered_text(overview_url)
    assert "Source descent" in overview, overview[:1500]
    assert f"Created by ui tester ({project})" in overview, overview[:1500]  # the key that submitted it
    assert "No description" not in overview  # the run's note describes the job
    assert screenshot(overview_url, "job-overview").stat().st_size > 10_000

    # The final model, a logged model of the run, lists its metrics (on the run's dataset).
    experiment_id, run_id = job["mlflow"]["experiment_id"], job["mlflow"]["run_id"]
    [model] = stack.mlflow.search_logged_models(experiment_ids=[experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'")  # fmt: skip
    model_url = f"{url.split('#/')[0]}#/experiments/{experiment_id}/models/{model.model_id}?{MODEL_TRAINING_VIEW}"
    model_page = rendered_text(model_url)
    metrics = {m.key: m.value for m in stack.mlflow.get_logged_model(model.model_id).metrics}
    assert set(metrics) == {"val_loss", "val_accuracy"}
    for key, value in metrics.items():  # its table: metric, dataset (digest), source run, value
        row = rf"{key} digits \(#[0-9a-f]+\) {JOB['name']} {re.escape(repr(value))}"
        assert re.search(row, model_page), (row, model_page[:3000])
    assert f"Created by ui tester ({project})" in model_page, model_page[:1500]
    assert screenshot(model_url, "job-logged-model").stat().st_size > 10_000


def test_probes_and_costs_have_sections_of_their_own(stack: Stack) -> None:
    # Per-layer probes and the diagnostics' costs are each a section (`grad_norm/…`,
    # `update_ratio/…`, `diagnostics_seconds/…`); every other metric, loss and accuracy
    # among them, is in "Model metrics". MLflow 3.17 lists prefixed sections first
    # (alphabetically), then "Model metrics": none of the names the issues fix can put the
    # curves above the probes (README, "What you can train"). Should MLflow change that rule,
    # this says the README is out of date.
    probes = {"every_steps": 5, "layer_grad_norms": True, "update_ratio": True}
    spec = JOB | {"name": "ui-probes", "diagnostics": probes}
    job = stack.wait(stack.submit(spec)["id"])
    assert job["status"] == "succeeded", job["error"]
    sections = chart_sections(job["mlflow"]["run_url"])
    assert [(s.name, s.charts) for s in sections] == [
        ("diagnostics_seconds", 3), ("grad_norm", 4), ("update_ratio", 4), ("Model metrics", 7)
    ], sections  # probes' costs (each probe, their read-back); the [32] MLP's four tensors; the plain job's 7
    assert screenshot(job["mlflow"]["run_url"], "job-with-probes-model-metrics").stat().st_size > 10_000
