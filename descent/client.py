"""A Python client of the Descent API (/v1), on httpx.

    from descent import Client
    client = Client()                      # DESCENT_URL / DESCENT_API_KEY, or the config file
    job = client.submit({"dataset": {"name": "digits"}, "optimizer": {"name": "adam"}})
    done = client.wait(job["id"])          # follows the job's live events until it ends
    rows = client.metrics(job["id"])       # pandas.DataFrame(rows) -> metric, step, value
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from descent.config import resolve_connection

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "pruned"})
RECONNECT_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then give up: the server is gone, not blinking
# The events stream sends a keep-alive comment every 15 s: a read that waits longer
# than this means the connection is dead.
EVENTS_READ_TIMEOUT_S = 45.0
UPLOAD_TIMEOUT_S = 600.0


class DescentError(Exception):
    """An answer the API refused (status is its HTTP status), or no answer (status None).

    str() is the API's own message; `details` the 422's per-field problems
    ({"field", "msg", ...}) when there are some."""

    def __init__(self, status: int | None, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    def __str__(self) -> str:
        return self.message


def _error_from(response: httpx.Response) -> DescentError:
    try:
        body = response.json()
    except ValueError:
        body = None
    message, details = None, []
    if isinstance(body, dict):
        detail = body.get("detail")
        if isinstance(detail, list):  # a 422: {"message": "...", "detail": [{"field", "msg"}, ...]}
            details = [d for d in detail if isinstance(d, dict)]
            message = body.get("message") or "; ".join(f"{d.get('field')}: {d.get('msg')}" for d in details)
        elif isinstance(detail, str):
            message = detail
        elif isinstance(body.get("message"), str):
            message = body["message"]
    if not message:
        message = response.text.strip()[:500] or response.reason_phrase
    return DescentError(response.status_code, message, details)


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events -> {"event", "id", "data"}; keep-alive comments are skipped."""
    current: dict[str, Any] = {}
    data_lines: list[str] = []
    for line in lines:
        if not line:
            if data_lines:
                yield {"event": current.get("event", "message"), "id": current.get("id"),
                       "data": json.loads("\n".join(data_lines))}  # fmt: skip
            current, data_lines = {}, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data_lines.append(value)
            elif field in ("event", "id"):
                current[field] = value


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30) -> None:
        connection = resolve_connection(url, api_key)
        self.url = connection.url
        self.api_key = connection.api_key
        self.timeout = timeout
        headers = {"User-Agent": "descent-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DescentError(None, f"cannot reach the Descent API at {self.url}: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    # ------------------------------------------------------------------ jobs

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job; with the same idempotency key and spec a retry returns the same job."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list(self, status: str | None = None, limit: int | None = 20) -> list[dict[str, Any]]:
        """Newest first, up to `limit` jobs (None: all of them), following next_cursor."""
        jobs: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(jobs) < limit:
            params: dict[str, Any] = {"limit": 100 if limit is None else min(100, limit - len(jobs))}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/jobs", params=params)
            jobs.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor or not page["items"]:
                break
        return jobs

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a queued or running job to stop (a running job stops at its next step)."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def metrics(self, job_id: str, metric: str | None = None) -> list[dict[str, Any]]:
        """Every recorded point as rows {"metric", "step", "value"} (pandas.DataFrame(rows)),
        reading the pages the server hands out (its Link header's `next`) to the end."""
        histories: dict[str, list[dict[str, Any]]] = {}
        url: str | None = f"/v1/jobs/{job_id}/metrics"
        while url is not None:
            response = self._send("GET", url)
            for name, points in (response.json() or {}).items():
                histories.setdefault(name, []).extend(points)
            url = response.links.get("next", {}).get("url")
        return [
            {"metric": name, "step": point["step"], "value": point["value"]}
            for name, points in sorted(histories.items())
            if metric is None or name == metric
            for point in points
        ]

    def catalog(self) -> dict[str, Any]:
        """Every dataset, model, optimizer, schedule and loss, with fields and defaults."""
        return self._request("GET", "/v1/catalog")

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, path: str | Path, label: str | None = None, name: str | None = None) -> dict[str, Any]:
        """Upload your own data to your project: a CSV or Parquet file with `label` naming its
        label column, or an NPZ with arrays X and y. Uploading the same file again returns the
        dataset already stored. Jobs then use it as {"dataset": {"id": dataset["id"]}}."""
        path = Path(path)
        form = {key: value for key, value in {"label": label, "name": name}.items() if value is not None}
        # A large file takes a while to send and to check: the usual timeout is for small requests.
        slow = max(self.timeout, UPLOAD_TIMEOUT_S)
        timeout = httpx.Timeout(self.timeout, read=slow, write=slow)
        with path.open("rb") as file:
            return self._request("POST", "/v1/datasets", files={"file": (path.name, file)}, data=form, timeout=timeout)

    def datasets(self, limit: int = 100) -> list[dict[str, Any]]:
        """Your project's datasets, newest first."""
        return self._request("GET", "/v1/datasets", params={"limit": limit})["items"]

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; refused (409) while a queued or running job uses it."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # ------------------------------------------------------------------ live events

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's live events ({"event", "id", "data"}): a `snapshot`, then `state` and
        `progress`, ending with the `state` whose data["final"] is true. A dropped
        connection is resumed with Last-Event-ID, so nothing is missed."""
        return self._events(f"/v1/jobs/{job_id}/events", f"job {job_id}", last_event_id, deadline=None)

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job has ended and return it; TimeoutError after `timeout` seconds
        (the job goes on: wait again, or cancel it)."""
        self._wait(f"/v1/jobs/{job_id}/events", f"job {job_id}", timeout)
        return self.get(job_id)

    def _wait(self, path: str, what: str, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for _event in self._events(path, what, None, deadline):
                pass
        except _WaitRanOut as exc:
            raise TimeoutError(f"{what} had not ended after {timeout:g} s") from exc.__cause__

    # ------------------------------------------------------------------ studies

    def submit_study(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a study: a base job spec, a search space, a search method, seeds, an objective."""
        return self._request("POST", "/v1/studies", json=spec)

    def study(self, study_id: str) -> dict[str, Any]:
        """A study with its trials by status and its leaderboard."""
        return self._request("GET", f"/v1/studies/{study_id}")

    def studies(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/studies", params={"limit": limit})["items"]

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/studies/{study_id}/cancel")

    def study_events(self, study_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """A `snapshot`, then `trial` (a trial's state change) and `state` events, ending
        with the final `state` (which carries the leaderboard)."""
        return self._events(f"/v1/studies/{study_id}/events", f"study {study_id}", last_event_id, deadline=None)

    def wait_study(self, study_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the study has ended and return it; TimeoutError after `timeout` seconds."""
        self._wait(f"/v1/studies/{study_id}/events", f"study {study_id}", timeout)
        return self.study(study_id)

    def trials(self, study_id: str) -> list[dict[str, Any]]:
        """The study's trial jobs, newest first."""
        return self._request("GET", "/v1/jobs", params={"study_id": study_id, "limit": 100})["items"]

    # ------------------------------------------------------------------ event streams

    def _events(
        self, path: str, what: str, last_event_id: str | None, deadline: float | None
    ) -> Iterator[dict[str, Any]]:
        failures = 0

        def pause(seconds: float) -> None:  # before a reconnect, never past the deadline
            if deadline is not None:
                seconds = min(seconds, deadline - time.monotonic())
                if seconds <= 0:
                    raise _WaitRanOut
            time.sleep(seconds)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            read_timeout = EVENTS_READ_TIMEOUT_S
            if deadline is not None:
                read_timeout = max(0.1, min(read_timeout, deadline - time.monotonic()))
            timeout = httpx.Timeout(self.timeout, read=read_timeout)
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error_from(response)
                    for event in parse_sse(self._lines_until(response, deadline)):
                        failures = 0
                        if event["id"]:
                            last_event_id = event["id"]
                        yield event
                        if event["event"] == "state" and event["data"].get("final"):
                            return
            except httpx.TransportError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _WaitRanOut from exc
                if failures >= len(RECONNECT_DELAYS_S):
                    raise DescentError(None, f"lost the event stream of {what} at {self.url}: {exc}") from exc
                pause(RECONNECT_DELAYS_S[failures])
                failures += 1
                continue
            # The server closed the stream before the final state: come back where we were.
            if deadline is not None and time.monotonic() >= deadline:
                raise _WaitRanOut
            if failures >= len(RECONNECT_DELAYS_S):
                raise DescentError(None, f"the event stream of {what} keeps closing before it ends")
            pause(RECONNECT_DELAYS_S[failures])
            failures += 1

    @staticmethod
    def _lines_until(response: httpx.Response, deadline: float | None) -> Iterator[str]:
        for line in response.iter_lines():
            if deadline is not None and time.monotonic() >= deadline:
                raise _WaitRanOut
            yield line


class _WaitRanOut(Exception):
    """A wait's deadline passed; wait() and wait_study() turn it into a TimeoutError that names what."""
