"""Diagnostics through the real API, worker and MLflow server: the probe metrics at their
interval, the Hessian's metrics and verdict tag, the landscape and summary artifacts, and
the `diagnostics` object of GET /v1/jobs/{id}."""

from __future__ import annotations

import json

from tests.integration.conftest import Stack

DIAGNOSTICS = {
    "every_steps": 5,
    "layer_grad_norms": True,
    "update_ratio": True,
    "effective_lr": True,
    "per_class": True,
    "hessian": {"top_k": 5},
    "landscape": {"kind": "both", "resolution": 5},
}


def test_a_job_with_diagnostics_reports_them_everywhere(stack: Stack) -> None:
    spec = {"name": "it-diagnostics", "dataset": {"name": "iris"}, "model": {"arch": "mlp", "hidden": [16]},
            "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 3, "batch_size": 16,
            "diagnostics": DIAGNOSTICS}  # fmt: skip
    job = stack.wait(stack.submit(spec)["id"])
    assert job["status"] == "succeeded", job["error"]

    diagnostics = job["diagnostics"]
    hessian = diagnostics["hessian"]
    assert hessian["verdict"] in ("local_minimum", "saddle_point", "not_critical", "no_finite_minimum")
    assert len(hessian["top_eigenvalues"]) == 5 and hessian["samples"] == 120
    assert set(diagnostics["per_class"]) == {"setosa", "versicolor", "virginica"}
    assert 0 <= diagnostics["f1_macro"] <= 1
    assert {"hessian", "landscape_1d", "landscape_2d", "per_class"} <= set(diagnostics["costs_seconds"])

    run_id = job["mlflow"]["run_id"]
    run = stack.mlflow.get_run(run_id)
    assert run.data.tags["descent.hessian_verdict"] == hessian["verdict"]
    metrics = run.data.metrics
    assert metrics["hessian_max_eig"] == hessian["max_eig"]
    for name in ("hessian_min_eig", "hessian_positive_fraction", "hessian_sharpness_ratio", "val_f1_macro",
                 "val_precision/setosa", "effective_lr_median", "effective_lr_p10", "effective_lr_p90",
                 "grad_norm/0.weight", "update_ratio/2.bias", "diagnostics_seconds/hessian"):  # fmt: skip
        assert name in metrics, (name, sorted(metrics))
    total_steps = job["progress"]["total_steps"]
    steps = [m.step for m in stack.mlflow.get_metric_history(run_id, "update_ratio/0.weight")]
    assert sorted(steps) == list(range(0, total_steps, 5))

    artifacts = {a.path for a in stack.mlflow.list_artifacts(run_id, "diagnostics")}
    assert artifacts == {"diagnostics/summary.json", "diagnostics/landscape.json",
                         "diagnostics/landscape_1d.png", "diagnostics/landscape_2d.png"}  # fmt: skip
    with open(stack.mlflow.download_artifacts(run_id, "diagnostics/landscape.json")) as f:
        landscape = json.load(f)
    assert len(landscape["line"]["alpha"]) == 5
    assert len(landscape["plane"]["train_loss"]) == 5 and len(landscape["plane"]["train_loss"][0]) == 5
