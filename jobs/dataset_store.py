"""Every read and write of uploaded datasets (the `datasets` table).

A dataset belongs to a project: another project's dataset does not exist for the
caller. Jobs name an upload by id; at submission `resolve_uploaded_dataset` copies
the stored dataset's sizes into the spec (samples, shape, number of classes; the
class names stay here), so the spec validates anywhere without a database, and a
dataset in use by an unfinished job cannot be deleted.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import Dataset, Job
from jobs.repository import parse_uuid
from jobs.spec import UploadedDataset
from jobs.states import JobStatus
from jobs.uploads import ParsedUpload, UploadedArrays, decode_arrays

# A job in one of these states may still read its dataset.
UNFINISHED = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)


class UnknownDataset(LookupError):
    pass


class DatasetUnavailable(RuntimeError):
    """A job's dataset is gone, or not what the job was submitted with."""


def create_dataset(
    *, session: Session, project: str, name: str, label: str | None, upload: ParsedUpload
) -> tuple[Dataset, bool]:
    """(dataset, created). The same file with the same label column again is the dataset
    already stored (created False): uploads are content-addressed within a project."""
    label_column = "" if upload.format == "npz" else (label or "")
    earlier = session.scalar(
        select(Dataset).where(
            Dataset.project == project, Dataset.sha256 == upload.sha256, Dataset.label_column == label_column
        )
    )
    if earlier is not None:
        return earlier, False
    dataset = Dataset(
        project=project,
        name=name,
        format=upload.format,
        label_column=label_column,
        sha256=upload.sha256,
        size_bytes=upload.size_bytes,
        n_rows=upload.n_rows,
        shape=upload.shape,
        classes=upload.classes,
        feature_names=upload.feature_names,
        data=upload.stored,
    )
    session.add(dataset)
    session.flush()  # the same upload at the same moment fails here, on the unique index: call again
    return dataset, True


def get_dataset(*, session: Session, dataset_id: uuid.UUID, project: str, lock: str | None = None) -> Dataset | None:
    """The project's dataset, or None. lock="share" keeps it from being deleted until the
    transaction ends (a job being submitted on it); "update" is the deleter's lock."""
    query = select(Dataset).where(Dataset.id == dataset_id, Dataset.project == project)
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    return session.scalar(query)


def list_datasets(*, session: Session, project: str, limit: int = 100) -> list[Dataset]:
    query = select(Dataset).where(Dataset.project == project)
    query = query.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit)
    return list(session.scalars(query))


def unfinished_jobs_using(*, session: Session, dataset_id: uuid.UUID, project: str) -> list[Job]:
    query = select(Job).where(
        Job.project == project,
        Job.status.in_(UNFINISHED),
        Job.spec["dataset"]["id"].as_string() == str(dataset_id),
    )
    return list(session.scalars(query.order_by(Job.created_at)))


class DatasetInUse(RuntimeError):
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        listed = ", ".join(f"{job.id} ({job.status})" for job in jobs)
        super().__init__(f"the dataset is used by unfinished jobs: {listed}; cancel them or wait until they end")


def delete_dataset(*, session: Session, dataset_id: uuid.UUID, project: str) -> bool:
    """Delete the project's dataset; False when there is none; DatasetInUse while an
    unfinished job names it. The row lock orders this against a submission in flight."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, project=project, lock="update")
    if dataset is None:
        return False
    if users := unfinished_jobs_using(session=session, dataset_id=dataset_id, project=project):
        raise DatasetInUse(users)
    session.delete(dataset)
    return True


def resolve_uploaded_dataset(*, session: Session, project: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The raw spec with an uploaded dataset's metadata filled in from the database (what
    the client sent there is replaced, never trusted). UnknownDataset when the id is not
    one of this project's datasets. Anything else is left for JobSpec validation to judge."""
    dataset_spec = spec.get("dataset")
    if not isinstance(dataset_spec, dict) or "id" not in dataset_spec:
        return spec
    dataset_id = parse_uuid(dataset_spec["id"])
    if dataset_id is None:
        raise UnknownDataset(f"{dataset_spec['id']!r} is not a dataset id (the UUID POST /v1/datasets returned)")
    dataset = get_dataset(session=session, dataset_id=dataset_id, project=project, lock="share")
    if dataset is None:
        raise UnknownDataset(f"no dataset {dataset_spec['id']} in this project (GET /v1/datasets lists them)")
    resolved = copy.deepcopy(spec)
    resolved["dataset"] = dataset_spec | {
        "id": str(dataset.id),
        "name": dataset.name,
        "sha256": dataset.sha256,
        "n_samples": dataset.n_rows,
        "n_classes": len(dataset.classes),  # the names stay in the datasets row, not in every job's spec
        "shape": list(dataset.shape),
    }
    return resolved


def read_dataset_arrays(*, session: Session, dataset: UploadedDataset, project: str) -> UploadedArrays:
    """The stored arrays of a job's uploaded dataset: the very file the job was submitted with
    (the trainer checks the arrays against the spec's shape and classes)."""
    dataset_id = parse_uuid(dataset.id)
    row = get_dataset(session=session, dataset_id=dataset_id, project=project) if dataset_id else None
    if row is None:
        raise DatasetUnavailable(f"dataset {dataset.id} ('{dataset.name}') is no longer stored in project {project}")
    if row.sha256 != dataset.sha256:
        raise DatasetUnavailable(f"dataset {dataset.id} is not the one the job was submitted with (SHA-256 differs)")
    return decode_arrays(row.data)
