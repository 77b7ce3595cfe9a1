"""descent/ without a server: where the client finds the server and its key, reading a
spec file, error bodies and the SSE format, the exit codes of what never reaches a server.
What needs a server is in tests/integration/test_cli.py, against the real stack."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from descent.client import Client, DescentError, _error_from, parse_sse
from descent.config import DEFAULT_URL, ConfigError, resolve_connection
from descent.specfile import SpecFileError, load_spec

DESCENT = Path(sys.executable).parent / "descent"
PACKAGE = Path(__file__).resolve().parents[2] / "descent"


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DESCENT_URL", raising=False)
    monkeypatch.delenv("DESCENT_API_KEY", raising=False)
    (tmp_path / "descent").mkdir()
    return tmp_path / "descent" / "config.toml"


def test_without_anything_the_url_is_the_local_default_and_there_is_no_key(config_home: Path) -> None:
    assert resolve_connection() == resolve_connection(None, None)
    assert resolve_connection().url == DEFAULT_URL and resolve_connection().api_key is None


def test_arguments_beat_the_environment_which_beats_the_config_file(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_home.write_text('url = "http://file:1"\napi_key = "file-key"\n')
    assert (resolve_connection().url, resolve_connection().api_key) == ("http://file:1", "file-key")

    monkeypatch.setenv("DESCENT_URL", "http://env:2/")
    connection = resolve_connection()
    assert (connection.url, connection.api_key) == ("http://env:2", "file-key")  # each value on its own

    monkeypatch.setenv("DESCENT_API_KEY", "env-key")
    assert resolve_connection().api_key == "env-key"
    client = Client(url="http://arg:3", api_key="arg-key")
    assert (client.url, client.api_key) == ("http://arg:3", "arg-key")
    assert client._http.headers["Authorization"] == "Bearer arg-key"


def test_a_broken_config_file_is_refused_by_name(config_home: Path) -> None:
    config_home.write_text("url = http://no-quotes\n")
    with pytest.raises(ConfigError, match="config.toml"):
        resolve_connection()
    config_home.write_text("url = 8000\n")
    with pytest.raises(ConfigError, match="'url' must be a string"):
        resolve_connection()


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("spec.yaml", "name: [unclosed\n", "not valid YAML"),
        ("spec.json", '{"name": "x",}', "not valid JSON"),
        ("spec.yaml", "- a\n- b\n", "not a list"),
        ("spec.yaml", "", "not empty"),
        ("spec.yaml", "just words\n", "not a str"),
        ("spec.yaml", "1: one\n", "field name must be a string"),
    ],
)
def test_a_spec_file_that_is_not_a_mapping_of_fields_is_refused(tmp_path: Path, name: str, text: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecFileError, match=reason):
        load_spec(path)


def test_a_spec_file_reads_as_yaml_or_json(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\noptimizer: {name: adam, lr: 0.01}\n")
    (tmp_path / "b.json").write_text('{"name": "b", "epochs": 3}')
    assert load_spec(tmp_path / "a.yaml") == {"name": "a", "optimizer": {"name": "adam", "lr": 0.01}}
    assert load_spec(tmp_path / "b.json") == {"name": "b", "epochs": 3}
    with pytest.raises(SpecFileError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_error_bodies_become_the_api_message() -> None:
    invalid = httpx.Response(422, json={"message": "Invalid request: optimizer.lr: Input should be greater than 0",
                                        "detail": [{"field": "optimizer.lr", "msg": "Input should be greater than 0"}]})  # fmt: skip
    error = _error_from(invalid)
    assert (error.status, str(error)) == (422, "Invalid request: optimizer.lr: Input should be greater than 0")
    assert error.details[0]["field"] == "optimizer.lr"
    assert str(_error_from(httpx.Response(404, json={"detail": "job x not found"}))) == "job x not found"
    assert isinstance(_error_from(httpx.Response(502, text="")), DescentError)


def test_server_sent_events_are_parsed_as_the_stream_writes_them() -> None:
    lines = ["event: snapshot", "id: 1-0", 'data: {"status":"queued"}', "", ": keep-alive", "",
             "event: state", 'data: {"status":"succeeded","final":true}', ""]  # fmt: skip
    assert list(parse_sse(iter(lines))) == [
        {"event": "snapshot", "id": "1-0", "data": {"status": "queued"}},
        {"event": "state", "id": None, "data": {"status": "succeeded", "final": True}},
    ]


def test_the_package_imports_nothing_from_the_server_side() -> None:
    forbidden = {"api", "worker", "trainer", "jobs", "launcher", "torch"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descent(*args: str, config_home: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DESCENT_URL": f"http://127.0.0.1:{_closed_port()}", "DESCENT_API_KEY": "k",
                        "XDG_CONFIG_HOME": str(config_home.parent.parent)}  # fmt: skip
    return subprocess.run([str(DESCENT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_exit_codes_of_what_never_reaches_a_server(tmp_path: Path, config_home: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not\n- a mapping\n")
    refused = _descent("submit", str(bad), config_home=config_home)
    assert refused.returncode == 3, refused  # refused before sending: no server would be 4
    assert "mapping" in refused.stderr

    usage = _descent("jobs", "--limit", "0", config_home=config_home)
    assert usage.returncode == 3, usage

    unreachable = _descent("jobs", config_home=config_home)
    assert unreachable.returncode == 4, unreachable
    assert "cannot reach" in unreachable.stderr
