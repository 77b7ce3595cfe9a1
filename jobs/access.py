"""Projects and API keys: who may call the API, and whose objects they see.

A key is `dsk_` + 32 random bytes (URL-safe base64). Only its SHA-256 is stored:
a key that random needs no slow hash, and a fast one lets every request find its
key by an index lookup. The presented key's digest is compared in constant time.
DESCENT_BOOTSTRAP_KEY, when set, is a server-admin key (of the default project)
that lives only in the environment: the way the first key reaches a fresh deployment.

Who administers what (as Kubernetes separates cluster-admin from a namespace's admin,
and Determined a cluster admin from a workspace admin): a project admin manages its own
project's keys; a server admin creates projects and manages every project's keys. No
key reaches another project's jobs, studies or datasets, whatever its kind.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

import redis
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from jobs.models import DEFAULT_PROJECT, ApiKey, Project, utcnow
from jobs.settings import settings

log = logging.getLogger(__name__)

KEY_PREFIX = "dsk_"
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
PROJECT_NAME_RULE = "1-64 characters: lower-case letters, digits, '-' and '_', starting with a letter or digit"


@dataclass(frozen=True)
class Caller:
    """Who made a request: the project whose objects they may see, and what they administer."""

    project: str
    admin: bool  # manages its own project's keys
    key_id: uuid.UUID | None  # None for the bootstrap key
    server_admin: bool = False  # creates projects, manages every project's keys

    def administers(self, project: str) -> bool:
        return self.server_admin or (self.admin and self.project == project)


class ProjectExists(ValueError):
    pass


class UnknownProject(LookupError):
    pass


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@lru_cache(maxsize=1)
def _bootstrap_digest(bootstrap_key: str) -> str:
    """Hashed once, not on every request; "" when there is no bootstrap key."""
    return key_digest(bootstrap_key) if bootstrap_key else ""


def bootstrap_caller(presented: str) -> Caller | None:
    """The caller of the bootstrap key when that is the key presented (no database needed), else None."""
    bootstrap = _bootstrap_digest(settings.bootstrap_key.get_secret_value() if settings.bootstrap_key else "")
    if bootstrap and hmac.compare_digest(key_digest(presented), bootstrap):
        return Caller(project=DEFAULT_PROJECT, admin=True, key_id=None, server_admin=True)
    return None


def authenticate(*, session: Session, presented: str) -> Caller | None:
    """The caller a presented key stands for; None for an unknown or revoked key."""
    if (caller := bootstrap_caller(presented)) is not None:
        return caller
    digest = key_digest(presented)
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest))
    # The index found the row by its digest; compare again in constant time, so that
    # no timing difference depends on how much of a guessed key was right.
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_sha256, digest):
        return None
    return Caller(project=row.project, admin=row.admin, key_id=row.id, server_admin=row.server_admin)


def create_project(*, session: Session, name: str) -> Project:
    if not PROJECT_NAME.fullmatch(name):
        raise ValueError(f"project name {name!r}: {PROJECT_NAME_RULE}")
    if session.get(Project, name) is not None:
        raise ProjectExists(f"project {name!r} already exists")
    project = Project(name=name, created_at=utcnow())
    session.add(project)
    session.flush()
    return project


def project_exists(*, session: Session, name: str) -> bool:
    return session.get(Project, name) is not None


def ensure_project(*, session: Session, name: str) -> Project:
    return session.get(Project, name) or create_project(session=session, name=name)


def create_key(
    *, session: Session, project: str, admin: bool = False, server_admin: bool = False, label: str | None = None
) -> tuple[ApiKey, str]:
    """(row, the key itself): the caller shows the key once; only its digest is kept.
    A server-admin key is an admin key too."""
    if session.get(Project, project) is None:
        raise UnknownProject(f"project {project!r} does not exist")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        project=project, key_sha256=key_digest(key), prefix=key[:12], label=label, admin=admin or server_admin,
        server_admin=server_admin, created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, key


def get_key(*, session: Session, key_id: uuid.UUID) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def revoke_key(*, session: Session, key_id: uuid.UUID) -> ApiKey | None:
    """Revoke a key (at once: the next request with it is refused); None if there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        session.refresh(row)
        session.info[_REVOKED] = True  # announced once committed (see below)
    return row


def key_name(*, session: Session, key_id: uuid.UUID | None) -> str | None:
    """How a key is named to people (its MLflow runs' "Created by"): its label, or its prefix
    when it has none; None without a key (the bootstrap key, or a job from before 0016).
    A revoked key still names what it submitted."""
    if key_id is None:
        return None
    row = session.get(ApiKey, key_id)
    if row is None:
        return None
    return " ".join((row.label or "").split()) or row.prefix  # one line, whatever the label holds


def list_keys(*, session: Session, project: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if project is not None:
        query = query.where(ApiKey.project == project)
    return list(session.scalars(query))


# --------------------------------------------------------------------------- keys verified a moment ago
#
# A stored key's lookup is a pooled connection, a transaction and a query on every request;
# an API process remembers the keys it verified for a few seconds instead. A revocation
# still refuses the key at the next request, in every process: once it is committed, its
# process forgets its verified keys and counts one more revocation in Redis, and every
# process reads that count in the round trip it makes anyway for the invalid-key block
# (api/admission.check_not_blocked), forgetting what it verified under an older count.
# Without Redis, or while it does not answer, nothing is remembered (every request looks
# its key up), so a revocation made in another process is never missed; a revocation
# whose count could not be sent is honoured after VERIFIED_KEY_TTL_S at the latest.

VERIFIED_KEY_TTL_S = 5.0
_REVOKED = "descent.key_revoked"


@dataclass(frozen=True)
class _Verified:
    caller: Caller
    revocations: str  # the revocation count it was verified under
    until: float  # monotonic


_verified: dict[str, _Verified] = {}  # key digest -> a recent verification


def revocations_key() -> str:
    """The Redis counter of revocations, namespaced like the API's other keys by QUEUE_NAME."""
    return ":".join(("descent", settings.queue_name, "keys-revoked"))


def recently_verified(presented: str, revocations: str | None) -> Caller | None:
    """The caller of a stored key this process verified within VERIFIED_KEY_TTL_S, with no
    revocation counted since (`revocations`: the count read from Redis just now; None
    when Redis did not answer, which uses nothing remembered)."""
    if revocations is None:
        return None
    digest = key_digest(presented)
    seen = _verified.get(digest)
    if seen is None:
        return None
    if seen.revocations != revocations or time.monotonic() >= seen.until:
        _verified.pop(digest, None)
        return None
    return seen.caller


def remember_verified(presented: str, caller: Caller, revocations: str | None) -> None:
    """Remember a stored key just verified under the revocation count read before its lookup."""
    if revocations is None or caller.key_id is None:
        return
    if len(_verified) > 10_000:  # many keys at once: start again rather than grow
        _verified.clear()
    _verified[key_digest(presented)] = _Verified(caller, revocations, time.monotonic() + VERIFIED_KEY_TTL_S)


@lru_cache(maxsize=1)
def _redis() -> redis.Redis | None:
    if not settings.events_url:
        return None
    return redis.Redis.from_url(settings.events_url, socket_connect_timeout=1, socket_timeout=1)


@event.listens_for(Session, "after_commit")
def _announce_revocation(session: Session) -> None:
    if not session.info.pop(_REVOKED, False):
        return
    _verified.clear()
    client = _redis()
    if client is None:
        return
    try:
        client.incr(revocations_key())
    except redis.RedisError as exc:
        log.warning("a revoked key could not be announced to the other API processes (%s); they refuse it within "
                    "%.0f s", type(exc).__name__, VERIFIED_KEY_TTL_S)  # fmt: skip


@event.listens_for(Session, "after_rollback")
def _forget_revocation(session: Session) -> None:
    session.info.pop(_REVOKED, None)
