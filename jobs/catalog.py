"""What can be asked for, generated from the spec's registries (never a hand-kept list)."""

from __future__ import annotations

from typing import Any

from jobs.spec import LOSS_DESCRIPTIONS, TAGGED_FIELDS, JobSpec, SpecModel, UploadedDataset


def _fields(model: type[SpecModel], skip: set[str]) -> dict[str, Any]:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    fields = {}
    for name, prop in schema.get("properties", {}).items():
        if name in skip:
            continue
        fields[name] = _inline(prop, defs)
    return fields


def _inline(schema: Any, defs: dict[str, Any]) -> Any:  # noqa: ANN401
    """The schema with every $ref (an enum or nested model, at any depth) shown in place, without titles."""
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    if "$ref" in schema:
        schema = defs[schema.pop("$ref").rsplit("/", 1)[-1]] | schema
    schema.pop("title", None)
    inlined = {}
    for key, value in schema.items():
        if key == "default":
            inlined[key] = value
        elif key == "properties":  # field names, not schemas: a field may be called "title"
            inlined[key] = {name: _inline(field, defs) for name, field in value.items()}
        else:
            inlined[key] = _inline(value, defs)
    return inlined


def _shapes(cls: type[SpecModel], name: str, tag: str) -> dict[str, Any]:
    """Which data a model takes, and which shapes a dataset (with its defaults) can be read as."""
    if hasattr(cls, "TAKES"):
        return {"takes": [str(kind) for kind in cls.TAKES]}
    if hasattr(cls, "views"):
        return {"shapes": [str(view) for view in cls(**{tag: name}).views]}
    return {}


def build_catalog() -> dict[str, Any]:
    catalog: dict[str, Any] = {}
    plural = {"dataset": "datasets", "model": "models", "optimizer": "optimizers", "schedule": "schedules"}
    for field, (tag, registry) in TAGGED_FIELDS.items():
        catalog[plural[field]] = [
            {"name": name, "description": (cls.__doc__ or "").strip(), "fields": _fields(cls, {tag})}
            | _shapes(cls, name, tag)
            for name, cls in registry.items()
        ]
    # Your own data (POST /v1/datasets): a job sends these fields; the server fills in the rest.
    server_filled = set(UploadedDataset.model_fields) - {"id", "val_fraction"}
    catalog["uploaded_dataset"] = {
        "description": (UploadedDataset.__doc__ or "").strip(),
        "fields": _fields(UploadedDataset, server_filled),
    }
    catalog["losses"] = [{"name": str(name), "description": text} for name, text in LOSS_DESCRIPTIONS.items()]
    catalog["job"] = {
        "description": (JobSpec.__doc__ or "").strip(),
        "fields": _fields(JobSpec, set(TAGGED_FIELDS) | {"loss"}),
        "example": JobSpec().model_dump(mode="json"),
    }
    return catalog
