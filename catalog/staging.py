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

import sqlalchemy as sa

from catalog.model import DiskFormat, PermissionDenied, as_utc, utcnow
from catalog.permissions import Actor
from catalog.settings import STAGING_TTL_FLOOR_HOURS, STALE_RUN_FLOOR_SECONDS, Settings
from catalog.store import ensure_tables, metadata, open_catalog

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


# An upload sent part by part (a resumable upload session): the staged object is an S3 multipart
# upload, kept until its TTL (the staging record's) or completion. Who may send it is the staging
# record's owner; the client's idempotency key finds it again after the client died.
upload_sessions = sa.Table(
    "upload_sessions",
    metadata,
    sa.Column("upload_id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("idempotency_key", sa.String(128)),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("multipart_id", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("part_size", sa.BigInteger, nullable=False),
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("flow_run_id", sa.String(64)),  # set once completed: the upload flow took it over
    sa.UniqueConstraint("owner", "idempotency_key", name="upload_sessions_owner_key"),
)


# The parts of a session the service stored, by the ETag of their latest copy: what completion
# joins. (Not the store's part listing: SeaweedFS keeps every copy of a part sent twice and may
# list the first.)
upload_parts = sa.Table(
    "upload_parts",
    metadata,
    sa.Column("upload_id", sa.String(64), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("etag", sa.String(255), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
)


@dataclass(frozen=True)
class UploadSession:
    """An upload sent part by part: `size` bytes in parts of `part_size` (the last one shorter)."""

    staged: "StagedUpload"
    idempotency_key: str | None
    fingerprint: str
    multipart_id: str
    size: int
    part_size: int
    parameters: dict
    flow_run_id: str | None

    @property
    def upload_id(self) -> str:
        return self.staged.upload_id

    @property
    def part_count(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_length(self, number: int) -> int:
        """The size part `number` (1-based) must have."""
        return min(self.part_size, self.size - (number - 1) * self.part_size)


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


class StagingRecords:
    """The staging records of one catalog."""

    def __init__(self, engine: sa.Engine):
        self.engine = ensure_tables(engine, staging_records, staged_inspections, upload_sessions, upload_parts)

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
                conn.execute(upload_sessions.delete().where(upload_sessions.c.upload_id == upload_id))
                conn.execute(upload_parts.delete().where(upload_parts.c.upload_id == upload_id))
            return gone

    def open_session(self, staged: StagedUpload, *, idempotency_key: str | None, fingerprint: str,
                     multipart_id: str, size: int, part_size: int, parameters: dict) -> UploadSession | None:
        """Record a session of the staged upload `staged` (recorded before); None when its owner
        already has one under `idempotency_key` (a racing request opened it: use that one)."""
        session = UploadSession(staged=staged, idempotency_key=idempotency_key, fingerprint=fingerprint,
                                multipart_id=multipart_id, size=size, part_size=part_size, parameters=parameters,
                                flow_run_id=None)
        try:
            with self.engine.begin() as conn:
                conn.execute(upload_sessions.insert().values(
                    upload_id=staged.upload_id, owner=staged.owner, idempotency_key=idempotency_key,
                    fingerprint=fingerprint, multipart_id=multipart_id, size=size, part_size=part_size,
                    parameters=parameters))
        except sa.exc.IntegrityError:
            return None
        return session

    def _session_where(self, *where) -> UploadSession | None:
        query = sa.select(upload_sessions, staging_records).join(
            staging_records, staging_records.c.upload_id == upload_sessions.c.upload_id).where(*where)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        data = row._mapping
        staged = StagedUpload(**{c.name: (as_utc(data[c]) if c.name == "recorded_at" else data[c])
                                 for c in staging_records.c})
        return UploadSession(staged=staged, **{c.name: data[c] for c in upload_sessions.c
                                              if c.name not in ("upload_id", "owner")})

    def session(self, upload_id: str, owner: str) -> UploadSession | None:
        """`owner`'s session `upload_id` (None when there is none, or it is someone else's)."""
        return self._session_where(upload_sessions.c.upload_id == upload_id, upload_sessions.c.owner == owner)

    def session_by_key(self, owner: str, idempotency_key: str) -> UploadSession | None:
        return self._session_where(upload_sessions.c.owner == owner,
                                   upload_sessions.c.idempotency_key == idempotency_key)

    def part_stored(self, upload_id: str, number: int, etag: str, size: int) -> None:
        """Part `number` of the session was stored (again) as `etag`; the staging clock starts again."""
        with self.engine.begin() as conn:
            conn.execute(upload_parts.delete().where(upload_parts.c.upload_id == upload_id,
                                                     upload_parts.c.number == number))
            conn.execute(upload_parts.insert().values(upload_id=upload_id, number=number, etag=etag, size=size))
            conn.execute(staging_records.update().where(staging_records.c.upload_id == upload_id)
                         .values(recorded_at=utcnow()))

    def stored_parts(self, upload_id: str) -> dict[int, tuple[str, int]]:
        """The session's stored parts: number -> (ETag, size)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(upload_parts).where(upload_parts.c.upload_id == upload_id))
            return {row.number: (row.etag, row.size) for row in rows}

    def session_started(self, upload_id: str, flow_run_id: str) -> None:
        """The session was completed and `flow_run_id` registers its bytes."""
        with self.engine.begin() as conn:
            conn.execute(upload_sessions.update().where(upload_sessions.c.upload_id == upload_id)
                         .values(flow_run_id=flow_run_id))

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
