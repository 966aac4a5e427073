"""The image state table (SQLite by default, PostgreSQL by URL): it only persists.

Every write goes through `Catalog.commit`: a plan (a function of `catalog.operations`, or a single
rule through `Catalog.transition`) reads the rows it needs and returns the steps to take (new
images, moves computed by the rules of `catalog.rules`, a row removal); all of them are written in
one transaction, each move as `UPDATE ... WHERE id = ? AND version = ? [AND flow_run_id = owner]`
with its history row, each checked against the lifecycle table and invariants
(`catalog.lifecycle`). Two racing requests can never both win: the loser re-reads and the plan
decides again (it may now refuse). New images are counted against their datastore's capacity
while its accounting row is locked, so concurrent registrations cannot overrun it; the quotas of
their owner and group likewise, each under its own accounting row (also when `chown`/`chgrp`
moves an image to another user or group).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from catalog import lifecycle, rules
from catalog.model import (
    Bus,
    Changes,
    ConcurrentChange,
    DiskFormat,
    Image,
    ImageState,
    ImageType,
    OperationRecord,
    Quota,
    QuotaSubject,
    QuotaUsage,
    Refused,
    SubjectKind,
    missing_image,
    utcnow,
)
from catalog.permissions import Actor, Right, check_access, has_right
from catalog.settings import get_settings

metadata = sa.MetaData()

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False),
    # The name while the image holds it; NULL once it is being deleted, so the name is free at once.
    sa.Column("name_slot", sa.String(255), nullable=True),
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("group", sa.String(128), nullable=False),
    sa.Column("permissions", sa.Integer, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("persistent", sa.Boolean, nullable=False),
    sa.Column("bus", sa.String(16), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("datastore", sa.String(128), nullable=False),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("prev_state", sa.String(24)),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("attributes", sa.JSON, nullable=False, default=dict),
    sa.Column("size", sa.BigInteger),
    sa.Column("virtual_size", sa.BigInteger),
    sa.Column("source", sa.Text),
    sa.Column("source_etag", sa.String(128)),
    sa.Column("sha256", sa.String(64)),
    sa.Column("running_vms", sa.Integer, nullable=False, default=0),
    sa.Column("cloning_ops", sa.Integer, nullable=False, default=0),
    sa.Column("cloning_id", sa.Integer),
    sa.Column("snapshots", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
    sa.Column("last_operation", sa.JSON),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("upload_id", sa.String(64), unique=True),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("owner", "name_slot", name="uq_images_owner_name"),
    # An id is never given again once its image is deleted (history, CLONING_ID and messages name
    # images by id); PostgreSQL sequences never reuse ids, SQLite needs AUTOINCREMENT for that.
    sqlite_autoincrement=True,
)

# One row per datastore, locked (UPDATE) by every transaction that adds bytes to the datastore,
# so the capacity check and the insert it guards run one at a time per datastore on PostgreSQL
# (READ COMMITTED would let two checks read the same sum) and on SQLite alike.
datastore_accounts = sa.Table(
    "datastore_accounts",
    metadata,
    sa.Column("datastore", sa.String(128), primary_key=True),
    sa.Column("writes", sa.BigInteger, nullable=False, default=0),
)

# Quotas per user and per group: at most `max_images` images and `max_bytes` bytes (NULL: no
# limit) on one datastore, or on all of them (`datastore` ""). One row per subject in
# quota_accounts is locked (UPDATE) by every transaction that adds an image to the subject, for the
# same reason as datastore_accounts.
quota_limits = sa.Table(
    "quota_limits",
    metadata,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(128), primary_key=True),
    sa.Column("datastore", sa.String(128), primary_key=True),
    sa.Column("max_images", sa.BigInteger),
    sa.Column("max_bytes", sa.BigInteger),
)

quota_accounts = sa.Table(
    "quota_accounts",
    metadata,
    sa.Column("kind", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(128), primary_key=True),
    sa.Column("writes", sa.BigInteger, nullable=False, default=0),
)

# Snapshots of OS and DATABLOCK images (catalog/snapshots.py): one row per snapshot, a full copy
# of the image's bytes in its datastore. A row counts against capacity and quotas from the moment it
# is inserted (CREATING, before its object is written) until it is deleted, like an image row.
snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.Integer, nullable=False, index=True),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("parent", sa.Integer),  # the number of the snapshot the image's bytes came from, if any
    sa.Column("active", sa.Boolean, nullable=False, default=False),  # the image's bytes came from it
    sa.Column("datastore", sa.String(128), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("virtual_size", sa.BigInteger),
    sa.Column("sha256", sa.String(64)),
    sa.Column("object", sa.Text, nullable=False),
    sa.Column("etag", sa.String(128)),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("image_id", "number", name="uq_snapshots_image_number"),
    sa.UniqueConstraint("image_id", "name", name="uq_snapshots_image_name"),
    sqlite_autoincrement=True,
)

# The next snapshot number of each image: numbers only grow, a deleted snapshot's is never given again.
snapshot_numbers = sa.Table(
    "snapshot_numbers",
    metadata,
    sa.Column("image_id", sa.Integer, primary_key=True),
    sa.Column("next_number", sa.Integer, nullable=False),
)

history = sa.Table(
    "image_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.Integer, nullable=False, index=True),
    sa.Column("from_state", sa.String(24)),
    sa.Column("to_state", sa.String(24)),  # NULL: the row was removed (its objects are gone)
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default=""),
)

_WRITING = {"hcx_write": True}  # execution option of the connection that commits a plan
_ENUM_FIELDS = {"type": ImageType, "bus": Bus, "format": DiskFormat, "state": ImageState, "prev_state": ImageState}
_MAX_CAS_ATTEMPTS = 200


def _row_to_image(row: sa.Row) -> Image:
    data = dict(row._mapping)
    data["name_held"] = data.pop("name_slot") is not None
    for name, enum_type in _ENUM_FIELDS.items():
        if data[name] is not None:
            data[name] = enum_type(data[name])
    data["last_operation"] = OperationRecord.from_json(data["last_operation"])
    return Image(**data)


def _to_column(value):
    if isinstance(value, OperationRecord):
        return value.to_json()
    return value.value if hasattr(value, "value") and not isinstance(value, int) else value


def _columns(image: Image) -> dict:
    """The row values of an image (all but id, version and timestamps)."""
    values = {name: _to_column(getattr(image, name)) for name in images.c.keys()
              if name not in ("id", "name_slot", "version", "created_at", "updated_at", "prev_state")}
    values["name_slot"] = image.name if image.name_held else None
    return values


def dialect_insert(conn: sa.Connection, table: sa.Table):
    """The INSERT of this connection's dialect (it has ON CONFLICT DO NOTHING / DO UPDATE)."""
    return (postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)


def _to_quota(row: sa.Row) -> Quota:
    return Quota(subject=QuotaSubject(SubjectKind(row.kind), row.subject), datastore=row.datastore or None,
                 max_images=row.max_images, max_bytes=row.max_bytes)


def _subjects(image: Image) -> list[QuotaSubject]:
    """Whose quotas an image counts against, in the one order their accounting rows are locked
    (so two transactions never wait on each other's rows)."""
    return quota_subjects(owner=image.owner, group=image.group)


def quota_subjects(*, owner: str, group: str) -> list[QuotaSubject]:
    return sorted([QuotaSubject(SubjectKind.USER, owner), QuotaSubject(SubjectKind.GROUP, group)])


def _make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL lets readers run beside the flow's writer
            dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" below says how each transaction starts
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # a writer takes the write lock first: its reads never go stale
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("hcx_write") else "BEGIN")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


# --- the steps of a plan ---------------------------------------------------------------------

@dataclass(frozen=True)
class Move:
    """One row's part of a plan: the image as read, the changes a rule computed, the history message,
    and `owner`: the flow run that must still own the image for the write to happen (its fence)."""

    image: Image
    changes: Changes
    message: str
    owner: str | None = None


@dataclass(frozen=True)
class NewImage:
    """A row to insert (`image.id` is ignored), counted against `limit_bytes` of its datastore
    (None: unchecked). A move of the same plan refers to its id as `NEW_IMAGE_ID`."""

    image: Image
    message: str
    limit_bytes: int | None = None


@dataclass(frozen=True)
class Removal:
    """Drop a DELETE row whose objects are gone, fenced by the run that owns it."""

    image: Image
    message: str
    owner: str | None = None


@dataclass(frozen=True)
class RowWrite:
    """A write to a table beside `images` (the snapshots of catalog/snapshots.py), made in the plan's
    transaction after the steps before it; `write(conn)` may refuse (then nothing is written)."""

    image: Image
    write: Callable[[sa.Connection], None]


Step = Move | NewImage | Removal | RowWrite


class Reader(Protocol):
    """What a plan reads, inside the transaction that writes its steps: an image row by id, and
    (for the snapshots of catalog/snapshots.py) the rows of any query."""

    def __call__(self, image_id: int) -> Image | None: ...

    def rows(self, query: sa.Select) -> list[sa.Row]: ...


@dataclass(frozen=True)
class _TransactionReader:
    conn: sa.Connection

    def __call__(self, image_id: int) -> Image | None:
        return Catalog._read(self.conn, image_id)

    def rows(self, query: sa.Select) -> list[sa.Row]:
        return list(self.conn.execute(query))


NEW_IMAGE_ID = -1  # in a Move's changes: the id the plan's NewImage gets
NEW_IMAGE_MARK = "{new_image}"  # in a Move's message: the same id


class _Stale(Exception):
    """A compare-and-set lost the race: re-read and decide again."""


class Catalog:
    def __init__(self, url: str):
        self.engine = _make_engine(url)
        metadata.create_all(self.engine)

    # --- reading ---------------------------------------------------------------------------

    def get(self, image_id: int) -> Image:
        if (image := self.find(image_id)) is None:
            raise missing_image(image_id)
        return image

    def find(self, image_id: int) -> Image | None:
        with self.engine.connect() as conn:
            return self._read(conn, image_id)

    @staticmethod
    def _read(conn: sa.Connection, image_id: int) -> Image | None:
        row = conn.execute(sa.select(images).where(images.c.id == image_id)).first()
        return _row_to_image(row) if row else None

    def get_for(self, actor: Actor, image_id: int, right: Right) -> Image:
        """The image, if `actor` has `right` on it. One the actor may not even USE answers exactly
        as a missing one (its existence is its owner's business); otherwise the missing right is named."""
        image = self.get(image_id)
        check_access(actor, image, right)
        return image

    def list(self, actor: Actor | None = None, datastore: str | None = None, *, mine: bool = False) -> list[Image]:
        """Every image (`actor` None), or those `actor` may USE; `mine`: only the actor's own."""
        query = sa.select(images).order_by(images.c.id)
        if datastore:
            query = query.where(images.c.datastore == datastore)
        if mine and actor is not None:
            query = query.where(images.c.owner == actor.user)
        with self.engine.connect() as conn:
            found = [_row_to_image(r) for r in conn.execute(query)]
        if actor is None:
            return found
        return [i for i in found if has_right(actor, i, Right.USE)]

    def find_by_upload_id(self, upload_id: str) -> Image | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(images).where(images.c.upload_id == upload_id)).first()
        return _row_to_image(row) if row else None

    def history(self, image_id: int) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(history).where(history.c.image_id == image_id).order_by(history.c.id))
            return [dict(r._mapping) for r in rows]

    def touched_by(self, flow_run_id: str) -> list[int]:
        """Ids of the images a flow run moved (in the order it first moved them)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(history.c.image_id, sa.func.min(history.c.id).label("first"))
                .where(history.c.flow_run_id == flow_run_id)
                .group_by(history.c.image_id)
                .order_by("first")
            )
            return [r.image_id for r in rows]

    def used_bytes(self, datastore: str) -> int:
        with self.engine.connect() as conn:
            return self._used(conn, datastore)

    @staticmethod
    def _used(conn: sa.Connection, datastore: str) -> int:
        """Bytes of the datastore's images and of their snapshots."""
        image_bytes = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(images.c.size), 0)).where(images.c.datastore == datastore)
        ).scalar_one()
        snapshot_bytes = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(snapshots.c.size), 0)).where(snapshots.c.datastore == datastore)
        ).scalar_one()
        return int(image_bytes) + int(snapshot_bytes)

    def name_owner(self, owner: str, name: str) -> Image | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(images).where(images.c.owner == owner, images.c.name_slot == name)
            ).first()
        return _row_to_image(row) if row else None

    def check_name_free(self, owner: str, name: str, *, upload_id: str | None = None) -> None:
        holder = self.name_owner(owner, name)
        if holder is not None and (upload_id is None or holder.upload_id != upload_id):
            raise Refused(f"NAME is already taken by IMAGE {holder.id}: choose another --name or delete image {holder.id}.")

    def check_new_image(self, actor: Actor, *, name: str, type_: ImageType, persistent: bool,
                        upload_id: str | None = None) -> None:
        """Refuse a creation that breaks a rule, before any byte moves (the insert re-checks atomically)."""
        rules.validate_new_image(type_=type_, persistent=persistent)
        rules.validate_name(name)
        self.check_name_free(actor.user, name, upload_id=upload_id)

    def check_capacity(self, actor: Actor, *, datastore: str, limit_bytes: int | None, required: int,
                       skip: bool = False) -> None:
        """Refuse an image that does not fit its datastore, before anything is written (the insert
        checks again while it holds the datastore's accounting lock)."""
        limit = rules.capacity_limit(limit_bytes, skip=skip, is_admin=actor.is_admin)
        rules.check_capacity(datastore=datastore, limit=limit, used=self.used_bytes(datastore), required=required)

    # --- quotas ----------------------------------------------------------------------------

    def quotas_of(self, subject: QuotaSubject) -> list[Quota]:
        """The quotas set for a user or a group (all datastores first, then by datastore)."""
        with self.engine.connect() as conn:
            return self._quotas(conn, subject)

    @staticmethod
    def _quotas(conn: sa.Connection, subject: QuotaSubject) -> list[Quota]:
        rows = conn.execute(sa.select(quota_limits)
                            .where(quota_limits.c.kind == subject.kind.value, quota_limits.c.subject == subject.name)
                            .order_by(quota_limits.c.datastore))
        return [_to_quota(r) for r in rows]

    def all_quotas(self) -> list[Quota]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(quota_limits).order_by(
                quota_limits.c.kind, quota_limits.c.subject, quota_limits.c.datastore))
            return [_to_quota(r) for r in rows]

    def save_quota(self, quota: Quota) -> None:
        """Set a quota (replacing the one of the same subject and datastore); one with no limit at
        all is dropped."""
        key = {"kind": quota.subject.kind.value, "subject": quota.subject.name, "datastore": quota.datastore or ""}
        limits = {"max_images": quota.max_images, "max_bytes": quota.max_bytes}
        with self.engine.connect().execution_options(**_WRITING) as conn, conn.begin():
            if quota.unlimited:
                conn.execute(quota_limits.delete().where(*(quota_limits.c[k] == v for k, v in key.items())))
                return
            conn.execute(dialect_insert(conn, quota_limits).values(**key, **limits)
                         .on_conflict_do_update(index_elements=list(key), set_=limits))

    def usage(self, subject: QuotaSubject, datastore: str | None = None) -> QuotaUsage:
        with self.engine.connect() as conn:
            return self._usage(conn, subject, datastore)

    @staticmethod
    def _usage(conn: sa.Connection, subject: QuotaSubject, datastore: str | None) -> QuotaUsage:
        """What counts against a quota: every row still present (a DELETE row until its objects are
        gone), its `size` in bytes, and the bytes of its snapshots."""
        column = images.c.owner if subject.kind is SubjectKind.USER else images.c.group
        query = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(images.c.size), 0)).where(column == subject.name)
        snapshot_query = (sa.select(sa.func.coalesce(sa.func.sum(snapshots.c.size), 0))
                          .select_from(snapshots.join(images, images.c.id == snapshots.c.image_id))
                          .where(column == subject.name))
        if datastore is not None:
            query = query.where(images.c.datastore == datastore)
            snapshot_query = snapshot_query.where(images.c.datastore == datastore)
        count, size = conn.execute(query).one()
        return QuotaUsage(images=int(count), bytes=int(size) + int(conn.execute(snapshot_query).scalar_one()))

    def check_quota(self, *, owner: str, group: str, datastore: str, required_bytes: int,
                    new_images: int = 1, what: str = "this image") -> None:
        """Refuse a new image (or `new_images` 0: more bytes, a snapshot) of `owner` and `group` on
        `datastore` that a quota has no room for, before anything is written (the insert checks
        again under the accounting locks)."""
        with self.engine.connect() as conn:
            for subject in quota_subjects(owner=owner, group=group):
                self._check_subject(conn, subject, datastore, required_bytes, new_images=new_images, what=what)

    def _check_subject(self, conn: sa.Connection, subject: QuotaSubject, datastore: str, required_bytes: int,
                       *, new_images: int = 1, what: str = "this image") -> None:
        for quota in self._quotas(conn, subject):
            if quota.datastore in (None, datastore):
                rules.check_quota(quota, self._usage(conn, subject, quota.datastore), required_bytes=required_bytes,
                                  new_images=new_images, what=what)

    def _lock_quota_accounts(self, conn: sa.Connection, subjects: list[QuotaSubject]) -> None:
        """Take the accounting row lock of each subject that has a quota, for the rest of the transaction."""
        for subject in subjects:
            if not self._quotas(conn, subject):
                continue
            conn.execute(dialect_insert(conn, quota_accounts).values(kind=subject.kind.value, subject=subject.name, writes=0)
                         .on_conflict_do_nothing())
            conn.execute(quota_accounts.update()
                         .where(quota_accounts.c.kind == subject.kind.value, quota_accounts.c.subject == subject.name)
                         .values(writes=quota_accounts.c.writes + 1))

    def _charge_quotas(self, conn: sa.Connection, image: Image, subjects: list[QuotaSubject]) -> None:
        """`image` is about to count against `subjects` (a new image, or one changing hands): refuse
        when a quota of theirs has no room, judged under their accounting locks (the rows are
        counted before the write, so the image itself is not among them)."""
        self._lock_quota_accounts(conn, subjects)
        required = (image.size or 0) + self._snapshot_bytes(conn, image.id)
        for subject in subjects:
            self._check_subject(conn, subject, image.datastore, required)

    @staticmethod
    def _snapshot_bytes(conn: sa.Connection, image_id: int) -> int:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(snapshots.c.size), 0))
                                .where(snapshots.c.image_id == image_id)).scalar_one())

    def charge_bytes(self, conn: sa.Connection, image: Image, required: int, *, limit_bytes: int | None,
                     what: str) -> None:
        """`required` more bytes for `image` (a snapshot of it), inside a plan's transaction: checked
        against its datastore's capacity (`limit_bytes`, None: unchecked) and the quotas of its owner
        and group while their accounting rows are locked, as a new image is; no image is added."""
        self._lock_account(conn, image.datastore)
        if limit_bytes is not None:
            rules.check_capacity(datastore=image.datastore, limit=limit_bytes, used=self._used(conn, image.datastore),
                                 required=required, what=what)
        self._lock_quota_accounts(conn, _subjects(image))
        for subject in _subjects(image):
            self._check_subject(conn, subject, image.datastore, required, new_images=0, what=what)

    # --- writing: one transaction per plan -------------------------------------------------

    def commit(self, plan: Callable[[Reader], list[Step]], *, writer: str | None = None) -> list[Image | None]:
        """Write the steps `plan(read)` returns, all in one transaction; `writer` is the flow run
        recorded in the history rows. A plan may refuse (nothing is written); a lost race runs it
        again on fresh rows. Returns each step's row as written (None for a removal)."""
        steps: list[Step] = []
        for _ in range(_MAX_CAS_ATTEMPTS):
            try:
                # The plan reads inside the writing transaction: on SQLite that one holds the write
                # lock from its start (BEGIN IMMEDIATE), so what it read cannot go stale; on
                # PostgreSQL the compare-and-set catches a row moved meanwhile.
                with self.engine.connect().execution_options(**_WRITING) as conn, conn.begin():
                    steps = plan(_TransactionReader(conn))
                    ids = self._write(conn, steps, writer)
            except _Stale:
                continue
            except SqlIntegrityError:
                raise self._name_taken(steps) from None
            return [self.find(i) if i is not None else None for i in ids]
        raise ConcurrentChange(
            f"Image {', '.join(str(s.image.id) for s in steps)} kept changing under this request; try again.")

    def commit_rows(self, plan: Callable[[sa.Connection, Reader], list[Step]], *, writer: str | None = None) -> None:
        """`commit` for a plan that also writes rows of another catalog table on the same connection
        (a VM's disks, `catalog.vms`): those rows and the image moves commit together or not at all;
        an image moved meanwhile runs the plan again on fresh rows. The plan locks its own rows (SELECT
        ... FOR UPDATE) before it reads them; a unique constraint it breaks propagates for it to explain."""
        for _ in range(_MAX_CAS_ATTEMPTS):
            try:
                with self.engine.connect().execution_options(**_WRITING) as conn, conn.begin():
                    self._write(conn, plan(conn, lambda image_id: self._read(conn, image_id)), writer)
                return
            except _Stale:
                continue
        raise ConcurrentChange("The catalog kept changing under this request; try again.")

    def transition(self, image_id: int, rule: Callable[..., Changes], *args, owner: str | None = None,
                   writer: str | None = None, message: str = "",
                   expect: Callable[[Image], None] | None = None, **kwargs) -> Image:
        """Apply one rule, `rule(image, *args, **kwargs)`, to one image; `expect` may refuse first
        (e.g. a permission check) and `owner` fences the write. Both run on every attempt."""

        def plan(read: Reader) -> list[Step]:
            image = read(image_id) or self.get(image_id)  # get: the NotFound message
            if expect is not None:
                expect(image)
            rules.owned_by(image, owner)
            return [Move(image, rule(image, *args, **kwargs), message or rule.__name__.replace("_", " "), owner)]

        return self.commit(plan, writer=writer)[0]

    def _write(self, conn: sa.Connection, steps: list[Step], writer: str | None) -> list[int | None]:
        now = utcnow()
        new_id = None
        written: list[int | None] = []
        for step in steps:
            if isinstance(step, NewImage):
                new_id = self._insert(conn, step, writer, now)
                written.append(new_id)
            elif isinstance(step, RowWrite):
                step.write(conn)
                written.append(step.image.id)
            elif isinstance(step, Move):
                changes = {k: (new_id if v == NEW_IMAGE_ID and k == "cloning_id" else v)
                           for k, v in step.changes.items()}
                message = step.message.replace(NEW_IMAGE_MARK, str(new_id)) if new_id else step.message
                self._cas(conn, step.image, changes, step.owner, writer, message, now)
                written.append(step.image.id)
            else:
                self._remove(conn, step, writer, now)
                written.append(None)
        return written

    def _lock_account(self, conn: sa.Connection, datastore: str) -> None:
        """Take the datastore's accounting row lock for the rest of the transaction."""
        conn.execute(dialect_insert(conn, datastore_accounts).values(datastore=datastore, writes=0).on_conflict_do_nothing())
        conn.execute(datastore_accounts.update().where(datastore_accounts.c.datastore == datastore)
                     .values(writes=datastore_accounts.c.writes + 1))

    def _insert(self, conn: sa.Connection, step: NewImage, writer: str | None, now) -> int:
        image = step.image
        lifecycle.check_transition(None, image.state)
        lifecycle.check_invariants(image, holds_name=image.name_held)
        self._lock_account(conn, image.datastore)
        if step.limit_bytes is not None:
            rules.check_capacity(datastore=image.datastore, limit=step.limit_bytes,
                                 used=self._used(conn, image.datastore), required=image.size or 0)
        self._charge_quotas(conn, image, _subjects(image))
        values = {**_columns(image), "version": 0, "created_at": now, "updated_at": now}
        image_id = conn.execute(images.insert().values(**values)).inserted_primary_key[0]
        conn.execute(history.insert().values(image_id=image_id, from_state=None, to_state=image.state.value,
                                             flow_run_id=writer, at=now, message=step.message))
        return image_id

    def _cas(self, conn: sa.Connection, image: Image, changes: Changes, owner: str | None, writer: str | None,
             message: str, now) -> None:
        """One compare-and-set on the row's version (and owning run), with its history row; raises
        _Stale if the row moved since `image` was read (the transaction then rolls back)."""
        after = image.with_changes(**changes)
        lifecycle.check_transition(image.state, after.state)
        lifecycle.check_invariants(after, holds_name=after.name_held)
        if new_subjects := [s for s in _subjects(after) if s not in _subjects(image)]:  # chown, chgrp
            self._charge_quotas(conn, after, new_subjects)
        columns = _columns(after)
        values = {k: columns[k] for k in changes if k in columns}
        if "name_held" in changes or "name" in changes:
            values["name_slot"] = columns["name_slot"]
        if after.state is not image.state:
            values["prev_state"] = image.state.value
        values.update(version=image.version + 1, updated_at=now)
        where = [images.c.id == image.id, images.c.version == image.version]
        if owner is not None:
            where.append(images.c.flow_run_id == owner)
        if conn.execute(images.update().where(*where).values(**values)).rowcount != 1:
            raise _Stale()
        conn.execute(history.insert().values(image_id=image.id, from_state=image.state.value,
                                             to_state=after.state.value, flow_run_id=writer, at=now,
                                             message=message))

    def _remove(self, conn: sa.Connection, step: Removal, writer: str | None, now) -> None:
        image = step.image
        if image.state is not ImageState.DELETE:
            raise lifecycle.BrokenInvariant(f"Image {image.id} is {image.state.value}: only a DELETE row is removed.")
        where = [images.c.id == image.id, images.c.version == image.version]
        if step.owner is not None:
            where.append(images.c.flow_run_id == step.owner)
        if conn.execute(images.delete().where(*where)).rowcount != 1:
            raise _Stale()
        # Its snapshots' objects went with the image's (tasks.objects.image_objects): their rows go too.
        conn.execute(snapshots.delete().where(snapshots.c.image_id == image.id))
        conn.execute(snapshot_numbers.delete().where(snapshot_numbers.c.image_id == image.id))
        conn.execute(history.insert().values(image_id=image.id, from_state=image.state.value, to_state=None,
                                             flow_run_id=writer, at=now, message=step.message))

    def _name_taken(self, steps: list[Step]) -> Refused:
        """A unique constraint refused the write: say which image holds the name (or upload id)."""
        for step in steps:
            image = step.image
            if isinstance(step, NewImage) and image.upload_id:
                if (holder := self.find_by_upload_id(image.upload_id)) is not None:
                    return Refused(f"Upload {image.upload_id} already belongs to image {holder.id}: "
                                   "start a new upload.")
            if isinstance(step, (NewImage, Move)):
                after = image.with_changes(**step.changes) if isinstance(step, Move) else image
                if (holder := self.name_owner(after.owner, after.name)) is None:
                    continue
                if after.owner != image.owner:  # chown onto a name the new owner holds
                    return Refused(f"NAME is already taken by IMAGE {holder.id} of user {after.owner}: rename "
                                   f"image {image.id} (or image {holder.id}) first.")
                return Refused(f"NAME is already taken by IMAGE {holder.id}: choose another name "
                               f"or delete image {holder.id}.")
        return Refused("The catalog refused the change (a name or upload id is taken): try again.")


_opening = threading.Lock()
_making_tables = threading.Lock()


def ensure_tables(engine: sa.Engine, *tables: sa.Table) -> sa.Engine:
    """Tables another module adds to `metadata`: the catalog creates every table it knows when it
    opens; these too when it was opened before their module was imported. One thread at a time:
    concurrent CREATE TABLEs on one SQLite file fail with "database is locked"."""
    with _making_tables:
        _create_once(engine, tables)
    return engine


@lru_cache
def _create_once(engine: sa.Engine, tables: tuple[sa.Table, ...]) -> None:
    metadata.create_all(engine, tables=list(tables))


def open_catalog(url: str | None = None) -> Catalog:
    """The catalog of these settings (one engine per URL per process). Opened under a lock: a
    service's first requests arrive together, and concurrent CREATE TABLEs on one SQLite file fail
    with "database is locked" (SQLite does not wait for a lock a reader wants to upgrade)."""
    with _opening:
        return _open_catalog(url)


@lru_cache
def _open_catalog(url: str | None) -> Catalog:
    return Catalog(url or get_settings().catalog_url)
