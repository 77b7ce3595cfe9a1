"""What this server agrees to run: limits an operator sets (settings), checked at
submission so that a job that cannot be afforded is a 422 naming the limit, not a
worker busy for a week."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.settings import Settings
from jobs.spec import JobSpec


@dataclass(frozen=True)
class LimitBreach:
    field: str
    message: str


def limit_breaches(spec: JobSpec, limits: Settings) -> list[LimitBreach]:
    breaches = []

    def check(field: str, value: int, limit: int, what: str, setting: str) -> None:
        if value > limit:
            breaches.append(
                LimitBreach(field, f"{what} ({value:,}) is over this server's limit of {limit:,} ({setting})")
            )

    dataset = spec.dataset
    check("epochs", spec.epochs, limits.max_epochs, "epochs", "MAX_EPOCHS")
    check("epochs", spec.total_steps, limits.max_total_steps, "the run's total steps", "MAX_TOTAL_STEPS")
    check("dataset", dataset.n_samples, limits.max_dataset_samples, "the dataset's samples", "MAX_DATASET_SAMPLES")
    values = dataset.n_samples * dataset.n_features
    check("dataset", values, limits.max_dataset_values, "the dataset's values (samples x features)", "MAX_DATASET_VALUES")
    parameters = spec.model.n_parameters(spec.input_shape, dataset.n_classes)
    check("model", parameters, limits.max_model_parameters, "the model's parameters", "MAX_MODEL_PARAMETERS")
    if spec.diagnostics.hessian is not None:
        check("diagnostics.hessian", parameters, limits.max_hessian_parameters,
              "the model's parameters, for a Hessian diagnostic", "MAX_HESSIAN_PARAMETERS")  # fmt: skip
    return breaches
