"""Dependencies down: the API answers clearly, nothing is half-written, nothing is lost."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import httpx

from launcher.processes import ProcessGroup, api_command, wait_http
from launcher.stack import stack_env
from tests.integration.conftest import PG_PORT, PG_USER, Stack, free_port


def test_job_submitted_while_the_broker_is_down_runs_once_it_is_back(stack: Stack, tmp_path) -> None:
    # A second API on the same database whose broker address has nothing listening:
    # for it the broker is down. The stack's own reaper and worker see a working one,
    # as they would once the broker came back.
    settings = stack.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0", "api_port": free_port()}
    )
    group = ProcessGroup(log_dir=tmp_path, env=stack_env(settings))
    api = group.start("api-no-broker", api_command(settings))
    try:
        wait_http(f"http://127.0.0.1:{settings.api_port}/healthz", api)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30, headers=stack.api.headers
        ) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["database"] == "ok"
            assert ready.json()["broker"].startswith("unreachable")

            started = time.monotonic()
            response = client.post("/v1/jobs", json={"name": "no-broker", "dataset": {"name": "iris"}, "epochs": 2})
            assert time.monotonic() - started < 20
            assert response.status_code == 201, response.text
            assert response.json()["status"] == "queued"
    finally:
        group.stop_all()

    # Nobody received a message for it; the reaper notices it waited too long and sends it.
    done = stack.wait(response.json()["id"], timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1


class TcpProxy:
    """127.0.0.1:port -> target, which the test can cut and restore: a database outage
    seen from the API, without touching the machine's PostgreSQL."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: socket.socket | None = None
        self.connections: list[socket.socket] = []

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self.server.settimeout(0.2)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a database restart does."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.connections.clear()


def test_database_down_is_a_503_with_retry_after_and_the_api_recovers_by_itself(stack: Stack, tmp_path) -> None:
    proxy = TcpProxy(target_port=PG_PORT)
    proxy.start()
    through_proxy = urlsplit(stack.settings.database_url)._replace(
        netloc=f"{PG_USER}@127.0.0.1:{proxy.port}"
    ).geturl()
    settings = stack.settings.model_copy(update={"database_url": through_proxy, "api_port": free_port()})
    group = ProcessGroup(log_dir=tmp_path, env=stack_env(settings))
    api = group.start("api-via-proxy", api_command(settings))
    try:
        wait_http(f"http://127.0.0.1:{settings.api_port}/healthz", api)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30, headers=stack.api.headers
        ) as client:
            assert client.get("/v1/jobs").status_code == 200

            proxy.stop()
            for path in ("/v1/jobs", f"/v1/jobs/{uuid.uuid4()}"):
                down = client.get(path)
                assert down.status_code == 503, (path, down.text)
                assert down.headers["retry-after"]
                assert down.json() == {"detail": "the database is unreachable; try again shortly"}
            assert client.post("/v1/jobs", json={"epochs": 1}).status_code == 503
            assert client.get("/healthz").status_code == 200  # the process itself is fine
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"].startswith("unreachable")

            proxy.start()
            deadline = time.monotonic() + 20
            while client.get("/v1/jobs").status_code != 200:  # no restart: the pool reconnects
                assert time.monotonic() < deadline, "the API did not recover when the database came back"
                time.sleep(0.3)
            assert client.get("/readyz").status_code == 200
    finally:
        group.stop_all()
        proxy.stop()


def test_a_request_body_over_the_limit_is_a_413(stack: Stack) -> None:
    body = b'{"name": "' + b"x" * (stack.settings.max_request_bytes + 10) + b'"}'
    response = stack.api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
