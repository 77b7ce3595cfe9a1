"""Issue 17, "The API scales out": several API processes (API_WORKERS) behind one port
keep no state of their own that a limit depends on. The invalid-key block and the
project quota hold across processes: a blocked address is refused by every process, and
concurrent submissions of one project spread over the processes admit exactly as many
jobs as its limit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.security.api_stack import SMALL_JOB, ApiStack, api_stack, bearer

API_WORKERS = 2


@pytest.fixture(scope="module")
def processes(make_database, tmp_path_factory) -> Iterator[ApiStack]:  # noqa: ANN001
    with api_stack(make_database, tmp_path_factory.mktemp("processes"), api_workers=API_WORKERS,
                   auth_failure_limit=5, auth_failure_window_s=30.0) as stack:  # fmt: skip
        yield stack


def fresh_connection_get(stack: ApiStack, path: str, key: str, source: str = "127.0.0.1") -> httpx.Response:
    """A request on a connection of its own: the kernel hands each new connection to one
    of the processes, so a run of these reaches all of them. `source`: the client's
    address (any of 127.0.0.0/8), which the invalid-key limit counts by."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=stack.base_url, timeout=60, transport=transport) as client:
        return client.get(path, headers=bearer(key))


def serving_pids(stack: ApiStack) -> set[int]:
    api = next(child for child in stack.group.children if child.name == "api")
    return {p.pid for p in psutil.Process(api.process.pid).children() if "spawn_main" in " ".join(p.cmdline())}


def test_the_api_runs_as_several_processes(processes: ApiStack) -> None:
    assert len(serving_pids(processes)) == API_WORKERS
    assert processes.admin.get("/healthz").status_code == 200


def test_concurrent_submissions_of_one_project_admit_exactly_its_limit(processes: ApiStack) -> None:
    tenant = processes.tenant("spread")
    limit = 12
    assert processes.admin.put(f"/v1/projects/{tenant.project}/limits",
                               json={"max_active_jobs": limit}).status_code == 200  # fmt: skip

    def submit(i: int) -> int:
        with httpx.Client(base_url=processes.base_url, timeout=60, headers=bearer(tenant.key)) as client:
            return client.post("/v1/jobs", json=SMALL_JOB | {"name": f"spread-{i}"}).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = Counter(pool.map(submit, range(4 * limit)))
    assert answers == Counter({201: limit, 429: 3 * limit}), answers
    usage = tenant.api.get(f"/v1/projects/{tenant.project}/limits").json()
    assert usage["active_jobs"] == limit
    listed = tenant.api.get("/v1/jobs", params={"limit": 100}).json()["items"]
    assert len(listed) == limit  # a refused submission left no row behind


def test_a_key_revoked_in_one_process_is_refused_at_once_by_every_process(processes: ApiStack) -> None:
    """Each process remembers the keys it verified for a few seconds (no database lookup
    per request); a revocation, committed by whichever process took it, still refuses the
    key at the very next request in all of them."""
    tenant = processes.tenant("revoked")
    # Fresh connections spread over both processes: each verifies, and remembers, the key.
    assert {fresh_connection_get(processes, "/v1/jobs", tenant.key).status_code for _ in range(12)} == {200}
    key_id = next(k["id"] for k in processes.admin.get(f"/v1/projects/{tenant.project}/keys").json())
    assert processes.admin.delete(f"/v1/keys/{key_id}").status_code == 204
    # Each from an address of its own: a revoked key counts as an invalid one, and twelve
    # from one address would be over this stack's limit of five.
    answers = [fresh_connection_get(processes, "/v1/jobs", tenant.key, f"127.0.0.{10 + i}") for i in range(12)]
    assert {a.status_code for a in answers} == {401}, [a.text for a in answers]
    assert all("revoked" in a.json()["detail"] for a in answers)


def test_a_blocked_address_is_refused_by_every_process(processes: ApiStack) -> None:
    tenant = processes.tenant("blocked")
    guesses = [fresh_connection_get(processes, "/v1/jobs", "dsk_not-a-key-" + str(i)).status_code for i in range(7)]
    assert guesses[:5] == [401] * 5 and guesses[5:] == [429] * 2, guesses
    # Each on a new connection, so most likely both processes answer some: none lets the
    # valid key through while the address is blocked, the one that blocked it or not.
    assert {fresh_connection_get(processes, "/v1/jobs", tenant.key).status_code for _ in range(12)} == {429}
