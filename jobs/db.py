"""Engine and sessions, built from settings once per process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from jobs.settings import settings


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    # WAL lets the API read while a worker writes; the busy timeout waits out short locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=None)
def get_engine(url: str | None = None) -> Engine:
    url = url or settings.database_url
    if url.startswith("sqlite"):
        settings.ensure_home()
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {}
    if settings.database_idle_in_transaction_timeout_s > 0:
        # Enforced by the server, whatever the client does: a session left idle inside a
        # transaction (a request that hung, a stream that held its session) is ended, and
        # its connection and locks come back, instead of starving everyone else.
        timeout_ms = int(settings.database_idle_in_transaction_timeout_s * 1000)
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={timeout_ms}"
    engine = create_engine(
        url,
        connect_args=connect_args,
        # Up to twice DATABASE_POOL_SIZE, each opened when the load first needs it and kept:
        # with DATABASE_POOL_SIZE kept and as many again as overflow closed on return, a
        # process under steady load above the pool size (the API at 16 concurrent requests)
        # closed a connection whenever the kept ones were all idle and opened one again a
        # moment later: 1 GET in 5 paid a new PostgreSQL connection (a backend started).
        pool_size=pool_capacity(),
        max_overflow=0,
        pool_timeout=settings.database_pool_timeout_s,
    )
    _ping_connections_left_idle(engine)
    return engine


# A pooled connection that has been idle this long is pinged before it is handed out (a
# restarted or failed-over database, a proxy that dropped it); one back in the pool for
# less was in use just now. pool_pre_ping pinged at every checkout: one more round trip
# on every request, the most frequent statement the API sent. A connection that died
# within this window fails its request with a 503 (the error invalidates the pool's
# connections, so the next request reconnects), as a database that fails mid-request does.
PING_AFTER_IDLE_S = 1.0


def _ping_connections_left_idle(engine: Engine) -> None:
    dialect = engine.dialect

    @event.listens_for(engine, "connect")
    def _connected(_dbapi_connection, record) -> None:  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()  # new: no ping needed

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:  # noqa: ANN001
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:  # noqa: ANN001
        if time.monotonic() - record.info.get("idle_since", 0.0) < PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            # The pool discards this connection and checks out another (a fresh one if need be).
            raise exc.DisconnectionError() from error


def pool_capacity() -> int:
    """The PostgreSQL connections one process opens at most: DATABASE_POOL_SIZE, and as many
    again for bursts."""
    return 2 * settings.database_pool_size


def pool_exhausted() -> bool:
    """Every connection this process may open is checked out: the next request would wait."""
    pool = get_engine().pool
    if not isinstance(pool, QueuePool):
        return False
    return pool.checkedout() >= pool_capacity()


def session_factory() -> sessionmaker[Session]:
    return _sessionmaker(get_engine())


@lru_cache(maxsize=None)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Built once per engine: a sessionmaker makes a subclass of Session, and SQLAlchemy
    # copies every Session event listener onto each new subclass (0.4 ms, more as they
    # pile up), which a sessionmaker per request paid on every request.
    return sessionmaker(engine, expire_on_commit=False)


READS_ONLY = "descent.reads_only"


def reads_only(session: Session) -> Session:
    """Mark a fresh session as one that only reads: each statement is its own transaction
    (autocommit), which saves the BEGIN and ROLLBACK round trips of a transaction that
    would write nothing, and closing it sends nothing (see api/deps.get_session).
    Call it before the session's first statement; each statement sees what was committed
    when it ran."""
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    session.info[READS_ONLY] = True
    return session


def closing_sends_nothing(session: Session) -> bool:
    """Closing this session does no I/O: no transaction is open, or it only read in autocommit."""
    return not session.in_transaction() or bool(session.info.get(READS_ONLY))


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with session_factory()() as session:
        with session.begin():
            yield session


def ping_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))
