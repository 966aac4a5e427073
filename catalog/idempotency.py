"""Idempotency keys: a create sent again (after a timeout, a dropped connection, a killed client)
with the same key gets the answer of the first one instead of a second image or "NAME is already
taken". Keys belong to the user who sent them (two users never share one); a key names one
request, identified by its fingerprint: the same key with another request is refused.

A key is claimed before any work (its row is the lock: of two racing sends exactly one claims it,
the other is told it is in progress), settled with the flow run that does the work, and released
when the request was refused, so that a corrected request may use it. Keys are kept for
KEY_TTL; an older one is free again, and so is one whose run ended without leaving an image (the
image was deleted since, say: the same create sent again makes it anew).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from catalog.model import ConcurrentChange, Refused, as_utc, utcnow
from catalog.store import ensure_tables, metadata, open_catalog

KEY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 128

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(MAX_KEY_LENGTH), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("flow_run_id", sa.String(64)),  # NULL while the first request is still at work
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
)


def fingerprint(request: dict) -> str:
    """What identifies a request: the sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key: `flow_run_id` set when the same request was already done."""

    owner: str
    key: str
    flow_run_id: str | None = None


def _other_request(key: str) -> Refused:
    return Refused(f"Idempotency key {key!r} was used for another request: a key names one request (same name, "
                   "file and options); use a new key for a new request.")


class IdempotencyKeys:
    def __init__(self, engine: sa.Engine):
        self.engine = ensure_tables(engine, idempotency_keys)

    def claim(self, owner: str, key: str, request_fingerprint: str) -> Claim:
        """Take `key` for this request, or learn that the same request already ran (its flow run).
        Refused when the key names another request, or the same one still at work."""
        where = (idempotency_keys.c.owner == owner, idempotency_keys.c.key == key)
        now = utcnow()
        for _ in range(3):
            try:
                with self.engine.begin() as conn:
                    conn.execute(idempotency_keys.insert().values(
                        owner=owner, key=key, fingerprint=request_fingerprint, claimed_at=now))
                return Claim(owner, key)
            except SqlIntegrityError:
                pass
            with self.engine.begin() as conn:
                row = conn.execute(sa.select(idempotency_keys).where(*where)).first()
                if row is None:  # released meanwhile: claim again
                    continue
                if as_utc(row.claimed_at) < now - KEY_TTL:  # expired: free again
                    conn.execute(idempotency_keys.delete().where(*where, idempotency_keys.c.claimed_at == row.claimed_at))
                    continue
            if row.fingerprint != request_fingerprint:
                raise _other_request(key)
            if row.flow_run_id is None:
                raise ConcurrentChange(f"A request with idempotency key {key!r} is still at work: ask again in a "
                                       "moment, and you will get its answer.")
            return Claim(owner, key, row.flow_run_id)
        raise ConcurrentChange(f"Idempotency key {key!r} is being claimed and released by other requests: "
                               "ask again.")

    def done(self, owner: str, key: str, request_fingerprint: str) -> str | None:
        """The flow run of the same request sent before under `key` (None if there is none yet);
        nothing is claimed. Refused when the key names another request."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(idempotency_keys).where(
                idempotency_keys.c.owner == owner, idempotency_keys.c.key == key)).first()
        if row is None or as_utc(row.claimed_at) < utcnow() - KEY_TTL:
            return None
        if row.fingerprint != request_fingerprint:
            raise _other_request(key)
        return row.flow_run_id

    def settle(self, claim: Claim, flow_run_id: str) -> None:
        """The request of `claim` is done by `flow_run_id`: what a repeat of it is answered."""
        with self.engine.begin() as conn:
            conn.execute(idempotency_keys.update().where(
                idempotency_keys.c.owner == claim.owner, idempotency_keys.c.key == claim.key,
            ).values(flow_run_id=flow_run_id))

    def release(self, claim: Claim) -> None:
        """The request of `claim` was refused or failed before it started anything: the key is free."""
        with self.engine.begin() as conn:
            conn.execute(idempotency_keys.delete().where(
                idempotency_keys.c.owner == claim.owner, idempotency_keys.c.key == claim.key,
                idempotency_keys.c.flow_run_id.is_(None)))


    def forget(self, claim: Claim) -> None:
        """Drop a settled key whose work left nothing (its image was deleted since): it is free again."""
        with self.engine.begin() as conn:
            conn.execute(idempotency_keys.delete().where(
                idempotency_keys.c.owner == claim.owner, idempotency_keys.c.key == claim.key,
                idempotency_keys.c.flow_run_id == claim.flow_run_id))


def open_idempotency_keys(url: str | None = None) -> IdempotencyKeys:
    return IdempotencyKeys(open_catalog(url).engine)
