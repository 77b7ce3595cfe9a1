"""The pool's ping (jobs/db.py): a pooled connection is pinged only after it sat idle for
PING_AFTER_IDLE_S, so one in steady use costs no extra round trip per request, and one
the database dropped while it sat idle is replaced before anyone uses it."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Engine

from jobs.db import PING_AFTER_IDLE_S, get_engine
from tests.integration.conftest import _admin, pg_url

pytestmark = pytest.mark.integration


def backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


def counting_pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pings: list[int] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection) -> bool:  # noqa: ANN001
        pings.append(1)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return pings


def test_a_connection_in_steady_use_is_not_pinged_one_left_idle_is(make_database, monkeypatch) -> None:  # noqa: ANN001
    engine = get_engine(pg_url(make_database("pool_ping")))
    try:
        pings = counting_pings(engine, monkeypatch)
        first = backend_pid(engine)  # a new connection: not pinged
        assert [backend_pid(engine) for _ in range(20)] == [first] * 20
        assert pings == []
        time.sleep(PING_AFTER_IDLE_S + 0.2)
        assert backend_pid(engine) == first
        assert pings == [1]
    finally:
        engine.dispose()


def test_a_connection_dropped_while_idle_is_replaced_before_it_is_used(make_database) -> None:  # noqa: ANN001
    engine = get_engine(pg_url(make_database("pool_drop")))
    try:
        dropped = backend_pid(engine)
        _admin(f"SELECT pg_terminate_backend({dropped})")  # as a restarted database or a proxy would
        time.sleep(PING_AFTER_IDLE_S + 0.2)
        assert backend_pid(engine) != dropped  # no error: the ping found it gone, the pool reconnected
    finally:
        engine.dispose()
