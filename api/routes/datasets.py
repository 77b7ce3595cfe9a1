"""/v1/datasets: upload, list, read and delete a project's own datasets. Routes only coordinate."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from api.deps import CallerDep, SessionDep
from api.errors import problem, unprocessable
from api.schemas import AUTH_RESPONSES, DatasetPublic, DatasetsPublic, Problem
from jobs import artifact_store, dataset_store, repository
from jobs.artifact_store import ArtifactStoreUnreachable
from jobs.models import Dataset
from jobs.settings import settings
from jobs.spec import NulFreeStr
from jobs.upload_sandbox import parse_in_child
from jobs.uploads import ACCEPTED, UploadRejected, receive_file

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=AUTH_RESPONSES)

NOT_FOUND = {404: {"model": Problem, "description": "No dataset with this id in the caller's project."}}
# The transport limit: the file plus the multipart framing and the small form fields.
# The file's own limit (MAX_UPLOAD_BYTES) is checked on what arrives, so it names the file.
MULTIPART_ALLOWANCE = 64 * 1024


def _dataset_or_404(session: SessionDep, caller: CallerDep, dataset_id: str) -> Dataset:
    parsed = repository.parse_uuid(dataset_id)
    dataset = dataset_store.get_dataset(session=session, dataset_id=parsed, project=caller.project) if parsed else None
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    return dataset


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    max_body_size=settings.max_upload_bytes + MULTIPART_ALLOWANCE,
    responses={
        200: {"model": DatasetPublic, "description": "This file (and label column) was uploaded before: that dataset."},
        400: {"model": Problem, "description": "The body is not a readable multipart form."},
        413: {
            "model": Problem,
            "description": "The file is over MAX_UPLOAD_BYTES; what it declares or holds is over MAX_DATASET_*, "
            "MAX_UPLOAD_COLUMNS, MAX_CLASSES or MAX_CLASS_NAME_CHARS; or reading it needs more than "
            "UPLOAD_PARSE_MEMORY_BYTES or UPLOAD_PARSE_TIMEOUT_S.",
        },
        415: {"model": Problem, "description": f"Not a file type this server reads: {ACCEPTED}."},
        503: {
            "model": Problem,
            "description": "UPLOAD_PARSE_CONCURRENCY uploads are being read, or the artifact store (MLflow) did "
            "not take a large dataset's arrays: try again.",
        },
    },
)
def upload_dataset(
    session: SessionDep,
    caller: CallerDep,
    response: Response,
    file: Annotated[UploadFile, File(description=f"The data: {ACCEPTED}.")],
    label: Annotated[
        NulFreeStr | None, Form(min_length=1, max_length=200, description="The label column (CSV, Parquet).")
    ] = None,
    name: Annotated[
        NulFreeStr | None, Form(min_length=1, max_length=200, description="A name for people; default: the file's name.")
    ] = None,
) -> DatasetPublic | JSONResponse:
    """Upload a dataset to the caller's project. It is checked and normalised before
    anything is stored; jobs then name it as `"dataset": {"id": ...}`."""
    try:  # the file goes to disk and is read by a bounded child process, never in this one
        with tempfile.TemporaryDirectory(prefix="descent-upload-") as workdir:
            received = receive_file(file.file, Path(workdir) / "upload", settings)
            upload = parse_in_child(received, file.filename, label, settings)
    except UploadRejected as exc:
        if exc.status == 422:
            return unprocessable([problem("body", exc.field, exc.message, "dataset_invalid")])
        raise HTTPException(exc.status, exc.message) from exc
    # A file name is the client's too: without its NULs (PostgreSQL cannot store them).
    display_name = name or (file.filename or "").replace("\x00", "").rsplit("/", 1)[-1][:200] or "dataset"
    try:  # large arrays go to MLflow's artifact store first, the row that points to them after
        dataset_id, stored = dataset_store.store_large_upload(project=caller.project, upload=upload)
    except ArtifactStoreUnreachable as exc:
        log.error("upload to project %s not stored: %s", caller.project, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the artifact store (MLflow) did not take the "
                            "dataset's arrays; try again shortly", {"Retry-After": "10"}) from exc  # fmt: skip

    def create() -> tuple[Dataset, bool]:
        return dataset_store.create_dataset(session=session, project=caller.project, name=display_name, label=label,
                                            upload=upload, dataset_id=dataset_id, stored=stored)  # fmt: skip

    try:
        dataset, created = create()
        session.commit()
    except IntegrityError:  # the same upload at the same moment: the other request stored it
        session.rollback()
        dataset, created = create()
    if not created:
        response.status_code = status.HTTP_200_OK
        if stored is not None:  # this file was stored before: the copy just put is nobody's
            artifact_store.delete_object(stored.uri)
    else:
        log.info("dataset %s (%s, %d rows) uploaded to project %s", dataset.id, dataset.format, dataset.n_rows,
                 caller.project)  # fmt: skip
    return DatasetPublic.from_row(dataset)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DatasetsPublic:
    """The caller's project's datasets, newest first."""
    rows = dataset_store.list_datasets(session=session, project=caller.project, limit=limit)
    return DatasetsPublic(items=[DatasetPublic.from_row(row) for row in rows])


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=NOT_FOUND)
def get_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> DatasetPublic:
    return DatasetPublic.from_row(_dataset_or_404(session, caller, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "Queued or running jobs use the dataset."}},
)
def delete_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> Response:
    parsed = repository.parse_uuid(dataset_id)
    try:
        deleted = parsed and dataset_store.delete_dataset(session=session, dataset_id=parsed, project=caller.project)
    except dataset_store.DatasetInUse as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {dataset_id} cannot be deleted: {exc}") from exc
    if not deleted:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    object_uri = deleted.object_uri
    session.commit()
    if object_uri is not None:  # after the commit: a failure leaves an unused object, not a row without its arrays
        artifact_store.delete_object(object_uri)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
