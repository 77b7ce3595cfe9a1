"""One MLflow run per job, always addressed by explicit id (never the fluent
active-run stack, which outlives a crashed task in the same process)."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # noqa: E402

from jobs.db import session_scope  # noqa: E402
from jobs.mlflow_tenancy import project_experiment_id  # noqa: E402
from jobs.models import DEFAULT_PROJECT  # noqa: E402
from jobs.settings import settings  # noqa: E402
from jobs.spec import (  # noqa: E402
    ImageDataset,
    JobSpec,
    SyntheticDataset,
    TokenSequenceDataset,
    UploadedDataset,
)
from trainer.reporting import TrainingResult  # noqa: E402
from worker.dataset_cache import image_set_digest  # noqa: E402
from worker.diagnostic_figures import line_figure, plane_figure  # noqa: E402

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100
MLFLOW_DIGEST_CHARS = 36  # the longest dataset digest MLflow stores


def open_run(
    client: MlflowClient,
    spec: JobSpec,
    job_id: uuid.UUID,
    attempt: int,
    project: str = DEFAULT_PROJECT,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Create the job's run with the spec as dotted params and searchable tags; (experiment_id, run_id)."""
    with session_scope() as session:  # `<project>/<experiment>`, made by Descent for this project only
        experiment_id = project_experiment_id(client, session, project, spec.experiment or settings.default_experiment)
    tags = {
        "descent.job_id": str(job_id),
        "descent.project": project,
        "descent.attempt": str(attempt),
        "optimizer": spec.optimizer.name,
        "schedule": spec.schedule.name,
        "dataset": spec.dataset.name,
        "model": spec.model.arch,
        "loss": str(spec.loss),
    } | (extra_tags or {})  # a study's trial: its parent run, study, configuration and seed
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    params = [Param(key, value[:6000]) for key, value in spec.flat_params().items()]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])
    client.log_inputs(run.info.run_id, datasets=[dataset_input(spec, project)])
    return experiment_id, run.info.run_id


def dataset_input(spec: JobSpec, project: str) -> DatasetInput:
    """The job's dataset as the run's training input, whatever it is: an upload, a standard
    image set from the cache, or a bundled or generated set."""
    if isinstance(spec.dataset, UploadedDataset):
        return uploaded_dataset_input(spec.dataset, project)
    return builtin_dataset_input(spec)


def builtin_dataset_input(spec: JobSpec) -> DatasetInput:
    """A built-in set: the digest of an image set is its checksum table's (the same files, the
    same digest, on every worker); of a bundled or generated set, its spec's parameters (and the
    seed, which generates a synthetic set). The splits the job trains and validates on are the
    profile; subset, validation and augmentation are in the run's params."""
    dataset = spec.dataset
    n_train, n_val = spec.split_sizes
    if isinstance(dataset, ImageDataset):
        digest = image_set_digest(dataset.name)
        source = {"builtin": dataset.name, "reader": "torchvision", "datasets_dir": str(settings.datasets_dir),
                  "checksums_sha256": digest}  # fmt: skip
    else:
        generated = isinstance(dataset, (SyntheticDataset, TokenSequenceDataset))
        recipe = {"spec": dataset.model_dump(mode="json")} | ({"seed": spec.seed} if generated else {})
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        source = {"builtin": dataset.name, "reader": "scikit-learn" if not generated else "descent"} | recipe
    profile = {"num_rows": n_train + n_val, "num_features": dataset.n_features, "train_samples": n_train,
               "validation_samples": n_val}  # fmt: skip
    entity = Dataset(
        name=dataset.name,
        digest=digest[:MLFLOW_DIGEST_CHARS],
        source_type="descent",
        source=json.dumps(source),
        schema=json.dumps({"shape": list(spec.input_shape.dims), "n_classes": dataset.n_classes}),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def uploaded_dataset_input(dataset: UploadedDataset, project: str) -> DatasetInput:
    """The upload as the run's training input: its digest is the file's SHA-256 (cut to the
    MLflow limit, MLFLOW_DIGEST_CHARS); the whole hash and the id are in the source."""
    entity = Dataset(
        name=dataset.name or dataset.id,
        digest=dataset.sha256[:MLFLOW_DIGEST_CHARS],
        source_type="descent",
        source=json.dumps({"dataset_id": dataset.id, "project": project, "sha256": dataset.sha256}),
        schema=json.dumps({"shape": dataset.shape, "n_classes": dataset.n_classes}),
        profile=json.dumps({"num_rows": dataset.n_samples, "num_features": dataset.n_features}),
    )
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def reopen_run(client: MlflowClient, run_id: str, attempt: int) -> None:
    """A later attempt continues the job's run (the reaper may have ended it FAILED)."""
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    client.set_tag(run_id, "descent.attempt", str(attempt))


def latest_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """{metric: highest step MLflow has}. Points of one metric are sent in step order,
    so every step up to it is there: a resumed attempt skips those."""
    return {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}


# The plot stays bounded at any class count (MAX_CLASSES = 1000 drew a 450-inch figure with a
# million text labels): counts in the cells up to CONFUSION_COUNTS_MAX_CLASSES classes, names on
# the axes up to CONFUSION_NAMES_MAX_CLASSES (cut to CONFUSION_NAME_CHARS), the figure at most
# CONFUSION_MAX_INCHES a side. Every count is in confusion_matrix.json.
CONFUSION_COUNTS_MAX_CLASSES = 30
CONFUSION_NAMES_MAX_CLASSES = 100
CONFUSION_NAME_CHARS = 24
CONFUSION_MAX_INCHES = 16.0


def confusion_figure(matrix: list[list[int]], class_names: list[str]) -> plt.Figure:
    counts = np.array(matrix)
    n = len(class_names)
    size = min(CONFUSION_MAX_INCHES, max(4.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues", interpolation="nearest")
    if n <= CONFUSION_NAMES_MAX_CLASSES:
        names = [name if len(name) <= CONFUSION_NAME_CHARS else name[: CONFUSION_NAME_CHARS - 1] + "…"
                 for name in class_names]  # fmt: skip
        fontsize = 8 if n <= CONFUSION_COUNTS_MAX_CLASSES else 5
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("predicted" if n <= CONFUSION_NAMES_MAX_CLASSES else f"predicted (class 0..{n - 1})")
    ax.set_ylabel("true" if n <= CONFUSION_NAMES_MAX_CLASSES else f"true (class 0..{n - 1})")
    ax.set_title("validation confusion matrix")
    if n <= CONFUSION_COUNTS_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            color = "white" if count > counts.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    # Margins from the longest tick label, in inches (~0.09 in a character at 10 pt):
    # tight_layout would measure them by drawing the whole figure once more (~40% of its cost).
    shown = names if n <= CONFUSION_NAMES_MAX_CLASSES else [str(n)]
    label = 0.09 * max((len(name) for name in shown), default=1)
    fig.subplots_adjust(left=(0.6 + label) / size, bottom=(0.6 + 0.75 * label) / size, right=1 - 0.2 / size,
                        top=1 - 0.45 / size)  # fmt: skip
    return fig


def log_results(client: MlflowClient, run_id: str, spec: JobSpec, result: TrainingResult) -> None:
    """The spec, the confusion matrix, the diagnostics and (optionally) the model, at the
    end of a job. The job says `succeeded` only once they are in, so they are sent at
    once from a few threads (each part is mostly a wait on MLflow); the first failure is
    raised, as if they had been sent one after another."""
    parts = [lambda: log_records(client, run_id, spec, result), lambda: log_figures(client, run_id, result)]
    if settings.log_model:
        parts.append(lambda: log_model(client, run_id, result))
    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="mlflow-results") as pool:
        futures = [pool.submit(part) for part in parts]
    for future in futures:
        future.result()


def log_records(client: MlflowClient, run_id: str, spec: JobSpec, result: TrainingResult) -> None:
    """The spec, the confusion matrix and the diagnostics as data, the Hessian's verdict as a tag."""
    client.log_text(run_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    client.log_dict(
        run_id, {"labels": result.class_names, "matrix": result.confusion_matrix}, "confusion_matrix.json"
    )
    if result.diagnostics:
        client.log_dict(run_id, result.diagnostics, "diagnostics/summary.json")
    hessian = result.diagnostics.get("hessian")
    if hessian is not None:
        client.set_tag(run_id, "descent.hessian_verdict", hessian["verdict"])
    if result.landscape is not None:
        client.log_dict(run_id, result.landscape, "diagnostics/landscape.json")


def log_figures(client: MlflowClient, run_id: str, result: TrainingResult) -> None:
    """The confusion matrix and the loss landscape's slices, drawn one after another
    (pyplot's figure registry is shared by the threads of a process)."""
    figures = [("confusion_matrix.png", lambda: confusion_figure(result.confusion_matrix, result.class_names))]
    for key, draw in (("line", line_figure), ("plane", plane_figure)):
        if result.landscape is not None and key in result.landscape:
            name = f"diagnostics/landscape_{'1d' if key == 'line' else '2d'}.png"
            figures.append((name, lambda draw=draw, key=key: draw(result.landscape[key])))
    for name, draw in figures:
        fig = draw()
        try:
            client.log_figure(run_id, fig, name)
        finally:
            plt.close(fig)


def model_save_options(model: torch.nn.Module) -> dict[str, Any]:
    """How a job's model is saved, here and in the worker's warm-up (worker/job_processes.py).

    pickle: it skips the slow torch.export path of the default 'pt2' format. The
    requirements are stated, not inferred: inference runs the model in a subprocess
    (~4 s a job). The trainer package goes with a model only when the model holds its
    classes (sequence and transformer models, token readers): a pickle needs their
    code wherever it is loaded, while a model of torch's own layers loads with torch
    alone, and each file of the package is one more upload at the end of the job.
    """
    import trainer

    own_classes = any(not type(module).__module__.startswith("torch.") for module in model.modules())
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    if any(type(module).__module__.startswith("torchvision.") for module in model.modules()):
        from trainer.vision import torchvision  # the resnet's blocks are torchvision's: its pickle needs them

        requirements.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    return {
        "serialization_format": "pickle",
        "pip_requirements": requirements,
        "code_paths": [str(Path(trainer.__file__).parent)] if own_classes else None,
    }


def log_model(client: MlflowClient, run_id: str, result: TrainingResult) -> None:
    """The model as a LoggedModel of the job's run, addressed by ids only.

    Made here and then filled by `log_model(model_id=...)`: given the run instead (or the
    fluent API's active run), MLflow reads every metric's whole history to tag the points
    of one step with the model (one request a metric, each as long as the run) and
    starts and ends the run around it: most of a short job's end, and growing with the run.
    """
    import mlflow.pytorch

    model = result.model.to("cpu").eval()
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id, params=dict(run.data.params)
    )
    client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=result.steps)])
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)  # the uploads go where the client points
    mlflow.pytorch.log_model(model, name="model", model_id=logged.model_id, **model_save_options(model))
