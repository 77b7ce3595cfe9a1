"""Reading a job spec file (YAML or JSON) before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class SpecFileError(ValueError):
    """The file cannot be read, is not YAML/JSON, or is not a mapping."""


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecFileError(f"cannot read {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(text)
        else:  # YAML, which also reads JSON
            spec = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML or JSON"
        raise SpecFileError(f"{path} is not valid {kind}: {exc}") from exc
    if not isinstance(spec, dict):
        found = "empty" if spec is None else f"a {type(spec).__name__}"
        raise SpecFileError(f"{path} must hold a mapping of spec fields (a job spec), not {found}")
    if not all(isinstance(key, str) for key in spec):
        raise SpecFileError(f"{path}: every spec field name must be a string")
    return spec
