"""Every read and write of uploaded datasets (the `datasets` table, and the stored arrays of
the large ones in MLflow's artifact store: jobs/artifact_store.py).

A dataset belongs to a project: another project's dataset does not exist for the
caller. Jobs name an upload by id; at submission `resolve_uploaded_dataset` copies
the stored dataset's sizes into the spec (samples, shape, number of classes; the
class names stay here), so the spec validates anywhere without a database, and a
dataset in use by an unfinished job cannot be deleted.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import artifact_store
from jobs.artifact_store import ArtifactCorrupt, ArtifactMissing, ArtifactStoreUnreachable, StoredObject
from jobs.models import Dataset, Job
from jobs.repository import parse_uuid
from jobs.settings import settings
from jobs.spec import UploadedDataset
from jobs.states import JobStatus
from jobs.uploads import ParsedUpload, UploadedArrays, decode_arrays

# A job in one of these states may still read its dataset.
UNFINISHED = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)


class UnknownDataset(LookupError):
    pass


class DatasetUnavailable(RuntimeError):
    """A job's dataset is gone, or not what the job was submitted with."""


class DatasetCorrupt(DatasetUnavailable):
    """The stored arrays read back are not those stored at upload."""

    error_type = "dataset_corrupt"


def dataset_uri(project: str, dataset_id: uuid.UUID) -> str:
    return artifact_store.object_uri("datasets", project, f"{dataset_id}.npz")


def store_large_upload(*, project: str, upload: ParsedUpload) -> tuple[uuid.UUID, StoredObject | None]:
    """The id of the dataset the upload may become, and the object of its stored arrays in the
    artifact store when they are over DATASET_INLINE_MAX_BYTES. Put before the row is written,
    with no database transaction open meanwhile: a failure in between leaves an unused object,
    never a row pointing to nothing. ArtifactStoreUnreachable when the store refused it."""
    dataset_id = uuid.uuid4()
    if len(upload.stored) <= settings.dataset_inline_max_bytes:
        return dataset_id, None
    return dataset_id, artifact_store.put_object(dataset_uri(project, dataset_id), upload.stored)


def create_dataset(
    *,
    session: Session,
    project: str,
    name: str,
    label: str | None,
    upload: ParsedUpload,
    dataset_id: uuid.UUID | None = None,
    stored: StoredObject | None = None,
) -> tuple[Dataset, bool]:
    """(dataset, created). The same file with the same label column again is the dataset
    already stored (created False; the caller deletes its own `stored` object then): uploads
    are content-addressed within a project. With `stored`, the row points to that object
    (store_large_upload) and holds no bytes."""
    label_column = "" if upload.format == "npz" else (label or "")
    earlier = session.scalar(
        select(Dataset).where(
            Dataset.project == project, Dataset.sha256 == upload.sha256, Dataset.label_column == label_column
        )
    )
    if earlier is not None:
        return earlier, False
    dataset = Dataset(
        id=dataset_id or uuid.uuid4(),
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
        data=upload.stored if stored is None else None,
        object_uri=stored.uri if stored is not None else None,
        object_size_bytes=stored.size_bytes if stored is not None else None,
        object_sha256=stored.sha256 if stored is not None else None,
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


def delete_dataset(*, session: Session, dataset_id: uuid.UUID, project: str) -> Dataset | None:
    """Delete the project's dataset (the deleted row: once committed, the caller deletes its
    object, `object_uri`, from the artifact store); None when there is none; DatasetInUse
    while an unfinished job names it. The row lock orders this against a submission in flight."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, project=project, lock="update")
    if dataset is None:
        return None
    if users := unfinished_jobs_using(session=session, dataset_id=dataset_id, project=project):
        raise DatasetInUse(users)
    session.delete(dataset)
    return dataset


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


@dataclass(frozen=True)
class LocatedDataset:
    """Where a job's stored arrays are: bytes read from the row, or an object in the store."""

    dataset_id: str
    inline: bytes | None
    stored: StoredObject | None


def locate_dataset(*, session: Session, dataset: UploadedDataset, project: str) -> LocatedDataset:
    """Where the stored arrays of a job's uploaded dataset are: the very file the job was
    submitted with (DatasetUnavailable otherwise). The database's part of reading them."""
    dataset_id = parse_uuid(dataset.id)
    row = get_dataset(session=session, dataset_id=dataset_id, project=project) if dataset_id else None
    if row is None:
        raise DatasetUnavailable(f"dataset {dataset.id} ('{dataset.name}') is no longer stored in project {project}")
    if row.sha256 != dataset.sha256:
        raise DatasetUnavailable(f"dataset {dataset.id} is not the one the job was submitted with (SHA-256 differs)")
    if row.object_uri is None:
        return LocatedDataset(dataset.id, row.data, None)
    return LocatedDataset(dataset.id, None, StoredObject(row.object_uri, row.object_size_bytes or 0,
                                                         row.object_sha256 or ""))  # fmt: skip


def read_located(located: LocatedDataset) -> UploadedArrays:
    """The arrays, from the row's bytes or from the artifact store (checked against the size and
    SHA-256 recorded at upload; no database transaction is needed meanwhile)."""
    if located.stored is None:
        return decode_arrays(located.inline or b"")
    try:
        data = artifact_store.get_object_waiting(located.stored, settings.artifact_store_wait_s)
    except ArtifactCorrupt as exc:
        raise DatasetCorrupt(f"dataset {located.dataset_id}'s arrays in MLflow's artifact store are not those "
                             f"stored at upload: {exc}; upload the file again") from exc  # fmt: skip
    except (ArtifactMissing, ArtifactStoreUnreachable) as exc:
        raise DatasetUnavailable(f"dataset {located.dataset_id}'s arrays could not be read from MLflow's "
                                 f"artifact store: {exc}") from exc  # fmt: skip
    return decode_arrays(data)


def read_dataset_arrays(*, session: Session, dataset: UploadedDataset, project: str) -> UploadedArrays:
    """The stored arrays of a job's uploaded dataset: the very file the job was submitted with
    (the trainer checks the arrays against the spec's shape and classes)."""
    return read_located(locate_dataset(session=session, dataset=dataset, project=project))
