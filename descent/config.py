"""Where the client finds the server and its key: arguments, then the environment
(DESCENT_URL, DESCENT_API_KEY), then ~/.config/descent/config.toml, then defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


class ConfigError(ValueError):
    """The config file exists but cannot be used."""


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "descent" / "config.toml"


def read_config_file(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for key in ("url", "api_key"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{path}: '{key}' must be a string")
    return {k: data[k] for k in ("url", "api_key") if k in data}


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str | None


def resolve_connection(url: str | None = None, api_key: str | None = None) -> Connection:
    """Each of url and key from the first place that has it; the file is read only when needed."""
    url = url or os.environ.get("DESCENT_URL") or None
    api_key = api_key or os.environ.get("DESCENT_API_KEY") or None
    if url is None or api_key is None:
        stored = read_config_file()
        url = url or stored.get("url")
        api_key = api_key or stored.get("api_key")
    return Connection(url=(url or DEFAULT_URL).rstrip("/"), api_key=api_key)
