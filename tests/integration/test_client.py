"""descent.Client against the real stack, where only a real server shows the behaviour:
`wait` with a timeout, and `events` surviving a dropped connection. Connections go
through a small TCP proxy that the test can cut or stall, as a flaky network would."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from descent.client import Client
from jobs.events import stream_key
from tests.integration.conftest import ADMIN_KEY, Stack
from tests.integration.test_events import as_tuple
from tests.integration.test_job_lifecycle import DIGITS_ADAM


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to the API. `drop()` cuts every open connection;
    while `stalled` is set nothing reaches the client (a silent, half-dead link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.from_clients: list[bytes] = []  # what clients sent, chunk by chunk (request heads among them)
        self.stalled = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client:
                    self.from_clients.append(data)
                while not from_client and self.stalled.is_set():
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self) -> None:
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self._open.clear()

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(stack.settings.api_port)
    yield flaky
    flaky.close()


@pytest.fixture
def client(proxy: FlakyProxy) -> Iterator[Client]:
    with Client(url=f"http://127.0.0.1:{proxy.port}", api_key=ADMIN_KEY) as c:
        yield c


def test_events_resume_after_a_dropped_connection_without_a_gap_or_a_repeat(
    stack: Stack, proxy: FlakyProxy, client: Client
) -> None:
    job = client.submit(DIGITS_ADAM | {"name": "it-client-events", "epochs": 400})
    received: list[dict] = []
    dropped_after: str | None = None
    for event in client.events(job["id"]):
        received.append(event)
        if dropped_after is None and sum(e["event"] == "progress" for e in received) >= 3:
            dropped_after = event["id"]
            proxy.drop()  # the network goes away mid-stream, while the job runs on
    assert dropped_after is not None
    final = received[-1]
    assert final["event"] == "state" and final["data"]["final"] and final["data"]["status"] == "succeeded"

    # It reconnected, saying where it was.
    event_requests = [r for r in proxy.from_clients if f"GET /v1/jobs/{job['id']}/events ".encode() in r]
    assert len(event_requests) == 2, event_requests
    assert b"last-event-id" not in event_requests[0].lower()
    assert f"last-event-id: {dropped_after}".encode() in event_requests[1].lower()

    # One snapshot, then every event the stream holds after it: each once, in order.
    assert [e["event"] for e in received].count("snapshot") == 1
    published = [i.decode() for i, _ in redis.Redis.from_url(stack.settings.events_url).xrange(stream_key(job["id"]))]
    after_snapshot = [i for i in published if as_tuple(i) > as_tuple(received[0]["id"])]
    assert [e["id"] for e in received[1:]] == after_snapshot, "events were lost or repeated across the reconnect"


def test_wait_returns_the_job_once_it_has_ended(client: Client) -> None:
    job = client.submit(DIGITS_ADAM | {"name": "it-client-wait", "epochs": 3})
    done = client.wait(job["id"], timeout=120)
    assert done["id"] == job["id"] and done["status"] == "succeeded"
    assert done["finished_at"] and done["metrics"]["val_accuracy"] > 0.8
    assert done == client.get(job["id"])


def test_wait_gives_up_at_its_timeout_with_a_clear_error(client: Client, proxy: FlakyProxy) -> None:
    job = client.submit(DIGITS_ADAM | {"name": "it-client-wait-timeout", "epochs": 500})
    try:
        # Events keep arriving: the wait ends at its timeout all the same.
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"job {job['id']} had not ended after 2 s"):
            client.wait(job["id"], timeout=2)
        assert 1.9 <= time.monotonic() - started < 4

        # A silent connection (nothing arrives, not even keep-alives): also at its timeout.
        proxy.stalled.set()
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"job {job['id']} had not ended after 1.5 s"):
            client.wait(job["id"], timeout=1.5)
        assert 1.4 <= time.monotonic() - started < 4
    finally:
        proxy.stalled.clear()
        client.cancel(job["id"])
    assert client.wait(job["id"], timeout=60)["status"] == "cancelled"
