"""Staging records: every upload the service stages is recorded before its first byte is written
(upload id, datastore, the staged object's bucket and key, who, when) and forgotten once its
bytes are adopted or deleted. The image API inspects and hashes the bytes while it stages them and
records what it found beside the record (`StagedInspection`, pinned to the staged object's ETag),
so the upload flow never reads the bytes back. Reconcile removes staged bytes only for uploads a record or an image
row knows; anything else under a staging prefix belongs to someone else and is only reported.

Also the floors of reconcile's limits (`reconcile_limits`): below them only the admin group may go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import sqlalchemy as sa

from catalog.model import DiskFormat, PermissionDenied, as_utc, utcnow
from catalog.permissions import Actor
from catalog.settings import STAGING_TTL_FLOOR_HOURS, STALE_RUN_FLOOR_SECONDS, Settings
from catalog.store import metadata, open_catalog

staging_records = sa.Table(
    "staging_records",
    metadata,
    sa.Column("upload_id", sa.String(64), primary_key=True),
    sa.Column("datastore", sa.String(128), nullable=False, index=True),
    sa.Column("bucket", sa.String(255), nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("group", sa.String(128), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


# What the image API found in bytes it staged, as it sent them: written only by the service (never
# from a request), valid only for the object of that ETag.
staged_inspections = sa.Table(
    "staged_inspections",
    metadata,
    sa.Column("upload_id", sa.String(64), primary_key=True),
    sa.Column("etag", sa.String(255), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("detected", sa.String(32), nullable=False),
    sa.Column("virtual_size", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class StagedInspection:
    """The format, sizes and sha256 of the staged object of ETag `etag`, found as it was staged."""

    etag: str
    size: int
    sha256: str
    format: DiskFormat
    detected: str
    virtual_size: int


@dataclass(frozen=True)
class StagedUpload:
    upload_id: str
    datastore: str
    bucket: str
    key: str
    owner: str
    group: str
    recorded_at: datetime

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def _to_record(row: sa.Row) -> StagedUpload:
    data = dict(row._mapping)
    data["recorded_at"] = as_utc(data["recorded_at"])
    return StagedUpload(**data)


@lru_cache
def _ensure_table(engine: sa.Engine) -> sa.Engine:
    """The catalog creates every table of `metadata` it knows when it opens; this one too when the
    catalog was opened before this module was imported."""
    staging_records.create(engine, checkfirst=True)
    staged_inspections.create(engine, checkfirst=True)
    return engine


class StagingRecords:
    """The staging records of one catalog."""

    def __init__(self, engine: sa.Engine):
        self.engine = _ensure_table(engine)

    def record(self, *, upload_id: str, datastore: str, bucket: str, key: str, owner: str, group: str) -> StagedUpload:
        """Record (again) that `owner` stages `upload_id` at s3://bucket/key now; a second record of
        the same upload (a retry staging it again) restarts its clock."""
        values = {"datastore": datastore, "bucket": bucket, "key": key, "owner": owner, "group": group,
                  "recorded_at": utcnow()}
        table = staging_records
        with self.engine.begin() as conn:
            updated = conn.execute(table.update().where(table.c.upload_id == upload_id).values(**values)).rowcount
            if not updated:
                conn.execute(table.insert().values(upload_id=upload_id, **values))
        return StagedUpload(upload_id=upload_id, **values)

    def find(self, upload_id: str) -> StagedUpload | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(staging_records).where(staging_records.c.upload_id == upload_id)).first()
        return _to_record(row) if row is not None else None

    def list(self, *, datastore: str | None = None, older_than: datetime | None = None) -> list[StagedUpload]:
        """Records (of one datastore), oldest first; with `older_than` only those recorded before it."""
        query = sa.select(staging_records).order_by(staging_records.c.recorded_at, staging_records.c.upload_id)
        if datastore is not None:
            query = query.where(staging_records.c.datastore == datastore)
        if older_than is not None:
            query = query.where(staging_records.c.recorded_at < older_than)
        with self.engine.connect() as conn:
            return [_to_record(row) for row in conn.execute(query)]

    def forget(self, upload_id: str, *, recorded_at: datetime | None = None) -> bool:
        """Drop the record and its inspection; with `recorded_at`, only if it was not recorded
        again since (a retry staging anew). Whether a record went."""
        query = staging_records.delete().where(staging_records.c.upload_id == upload_id)
        if recorded_at is not None:
            query = query.where(staging_records.c.recorded_at == recorded_at)
        with self.engine.begin() as conn:
            gone = bool(conn.execute(query).rowcount)
            if gone or recorded_at is None:
                conn.execute(staged_inspections.delete().where(staged_inspections.c.upload_id == upload_id))
            return gone

    def record_inspection(self, upload_id: str, inspection: StagedInspection) -> None:
        """What the bytes staged for `upload_id` were (replacing what an earlier staging found)."""
        values = {**inspection.__dict__, "format": inspection.format.value}
        table = staged_inspections
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.upload_id == upload_id))
            conn.execute(table.insert().values(upload_id=upload_id, **values))

    def inspection_of(self, upload_id: str) -> StagedInspection | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(staged_inspections).where(staged_inspections.c.upload_id == upload_id)).first()
        if row is None:
            return None
        data = dict(row._mapping)
        del data["upload_id"]
        return StagedInspection(**{**data, "format": DiskFormat(data["format"])})


def open_staging(url: str | None = None) -> StagingRecords:
    """The staging records of the catalog of these settings."""
    return StagingRecords(open_catalog(url).engine)


def reconcile_limits(settings: Settings, actor: Actor | None, *, staging_ttl_hours: float | None,
                     stale_after_seconds: int | None) -> tuple[float, int]:
    """The staging TTL and stale-run limit a reconcile run uses: the settings unless asked for
    others. Values below the floors (STAGING_TTL_FLOOR_HOURS, STALE_RUN_FLOOR_SECONDS) only for the
    admin group: a shorter TTL removes uploads still in flight, a shorter stale limit crashes live
    runs. `actor` None is the scheduled run (nobody asked). Refused with nothing done otherwise."""
    ttl = settings.staging_ttl_hours if staging_ttl_hours is None else staging_ttl_hours
    stale = settings.stale_run_seconds if stale_after_seconds is None else stale_after_seconds
    below = []
    if staging_ttl_hours is not None and staging_ttl_hours < STAGING_TTL_FLOOR_HOURS:
        below.append(f"a staging TTL of {staging_ttl_hours:g}h is below the floor of "
                     f"{STAGING_TTL_FLOOR_HOURS:g}h (a shorter one removes uploads still in flight)")
    if stale_after_seconds is not None and stale_after_seconds < STALE_RUN_FLOOR_SECONDS:
        below.append(f"a stale-run limit of {stale_after_seconds}s is below the floor of "
                     f"{STALE_RUN_FLOOR_SECONDS}s (a shorter one marks live runs crashed)")
    if below and (actor is None or not actor.is_admin):
        who = "a run nobody requested" if actor is None else f"user {actor.user} (group {actor.group})"
        raise PermissionDenied(
            f"Reconcile refused, nothing was done: {'; '.join(below)}. Only the {settings.admin_group} "
            f"group may go below the floors, and {who} is not in it: ask an administrator, or use values "
            "at or above the floors."
        )
    return ttl, stale
