"""The run's description and MLflow's own tags, as MLflow's UI shows them (jobs/tracking.py)."""

from __future__ import annotations

from jobs.spec import JobSpec
from jobs.tracking import MAX_NOTE_CHARS, run_note, run_user, standard_run_tags


def spec(**fields: object) -> JobSpec:
    return JobSpec.model_validate({"name": "note-job"} | fields)


def test_note_names_the_specs_main_choices() -> None:
    job = spec(
        dataset={"name": "digits", "val_fraction": 0.2},
        model={"arch": "mlp", "hidden": [32, 16]},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        schedule={"name": "warmup_cosine", "warmup_steps": 50},
        epochs=15,
        batch_size=64,
        seed=7,
    )
    assert run_note(job, "alpha") == (
        "Descent job `note-job` of project `alpha`: model mlp (hidden [32, 16], activation relu, dropout 0) "
        "trained on digits (1437 training / 360 validation samples, 20% held out of it for validation) "
        "with sgd (lr 0.05, momentum 0.9), schedule warmup_cosine (warmup_steps 50), "
        "for 15 epochs of batch size 64 (345 steps), seed 7."
    )


def test_note_says_the_default_learning_rate_and_an_image_sets_split() -> None:
    job = spec(dataset={"name": "cifar10", "subset": 1000}, model={"arch": "resnet"}, optimizer={"name": "adam"})
    note = run_note(job, "beta")
    assert "with adam (lr 0.001)," in note  # the default lr is said, not left out
    assert "cifar10 (1000 training / 10000 validation samples, validated on the official test split, " in note
    assert "a subset of 1000 training samples)" in note
    assert "model resnet (depth 18, width 1)" in note
    assert len(note) <= MAX_NOTE_CHARS


def test_standard_tags_say_source_user_and_description() -> None:
    job = spec()
    tags = standard_run_tags(job, "gamma")
    assert tags == {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "descent",
        "mlflow.user": "gamma",
        "mlflow.note.content": run_note(job, "gamma"),
    }


def test_the_user_is_the_submitting_keys_name_and_project() -> None:
    assert run_user("vision", "alice laptop") == "alice laptop (vision)"
    assert run_user("vision", "dsk_Ab3dEfGh") == "dsk_Ab3dEfGh (vision)"  # a key without a label: its prefix
    assert run_user("vision", None) == "vision"  # no key recorded (the bootstrap key's, or before 0016)
    job = spec()
    tags = standard_run_tags(job, "vision", run_user("vision", "alice laptop"))
    assert tags["mlflow.user"] == "alice laptop (vision)"
