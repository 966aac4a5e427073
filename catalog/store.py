"""The image state table (SQLite by default, PostgreSQL by URL) and its one way to change state.

Every state change goes through `Catalog.transition`: read the row, let a rule of
`catalog.rules` compute the new fields, then `UPDATE ... WHERE id = ? AND version = ?` together
with the history row, in one transaction. Two racing requests can never both win: the loser
re-reads and the rule decides again (it may now refuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from catalog import rules
from catalog.model import (
    Bus,
    ConcurrentChange,
    DiskFormat,
    Image,
    ImageState,
    ImageType,
    NotFound,
    Refused,
    utcnow,
)
from catalog.permissions import Actor, Right, has_right, require
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

history = sa.Table(
    "image_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.Integer, nullable=False, index=True),
    sa.Column("from_state", sa.String(24)),
    sa.Column("to_state", sa.String(24), nullable=False),
    sa.Column("flow_run_id", sa.String(64)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("message", sa.Text, nullable=False, default=""),
)

_ENUM_FIELDS = {"type": ImageType, "bus": Bus, "format": DiskFormat, "state": ImageState, "prev_state": ImageState}
_MAX_CAS_ATTEMPTS = 200


def _row_to_image(row: sa.Row) -> Image:
    data = dict(row._mapping)
    data.pop("name_slot")
    for name, enum_type in _ENUM_FIELDS.items():
        if data[name] is not None:
            data[name] = enum_type(data[name])
    return Image(**data)


def _to_column(value):
    return value.value if hasattr(value, "value") and not isinstance(value, int) else value


def _make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # WAL lets readers run beside the flow's writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class Catalog:
    def __init__(self, url: str):
        self.engine = _make_engine(url)
        metadata.create_all(self.engine)

    # --- reading ---------------------------------------------------------------------------

    def get(self, image_id: int) -> Image:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(images).where(images.c.id == image_id)).first()
        if row is None:
            raise NotFound(f"Image {image_id} does not exist: `hcx-image list` shows the images you can see.")
        return _row_to_image(row)

    def get_for(self, actor: Actor, image_id: int, right: Right) -> Image:
        image = self.get(image_id)
        require(actor, image, right)
        return image

    def list(self, actor: Actor | None = None, datastore: str | None = None) -> list[Image]:
        query = sa.select(images).order_by(images.c.id)
        if datastore:
            query = query.where(images.c.datastore == datastore)
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
            total = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(images.c.size), 0)).where(images.c.datastore == datastore)
            ).scalar_one()
        return int(total)

    def name_owner(self, owner: str, name: str) -> Image | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(images).where(images.c.owner == owner, images.c.name_slot == name)
            ).first()
        return _row_to_image(row) if row else None

    # --- writing ---------------------------------------------------------------------------

    def check_name_free(self, owner: str, name: str, *, upload_id: str | None = None) -> None:
        holder = self.name_owner(owner, name)
        if holder is not None and (upload_id is None or holder.upload_id != upload_id):
            raise Refused(f"NAME is already taken by IMAGE {holder.id}: choose another --name or delete image {holder.id}.")

    def check_new_image(self, actor: Actor, *, name: str, type_: ImageType, persistent: bool,
                        upload_id: str | None = None) -> None:
        """Refuse a creation that breaks a rule, before any byte moves (register re-checks atomically)."""
        rules.validate_new_image(type_=type_, persistent=persistent)
        rules.validate_name(name)
        self.check_name_free(actor.user, name, upload_id=upload_id)

    def check_capacity(self, actor: Actor, *, datastore: str, limit_bytes: int | None, required: int,
                       skip: bool = False) -> None:
        """Refuse an image that does not fit its datastore, before anything is written (register
        and begin_clone check again inside their transaction)."""
        limit = rules.capacity_limit(limit_bytes, skip=skip, is_admin=actor.is_admin)
        rules.check_capacity(datastore=datastore, limit=limit, used=self.used_bytes(datastore), required=required)

    @staticmethod
    def _new_row(*, actor: Actor, name: str, type_: ImageType, persistent: bool, bus: Bus, format_: DiskFormat,
                 datastore: str, state: ImageState, flow_run_id: str | None, upload_id: str | None,
                 **fields) -> dict:
        rules.validate_new_image(type_=type_, persistent=persistent)
        rules.validate_name(name)
        now = utcnow()
        return {
            "name": name,
            "name_slot": name,
            "owner": actor.user,
            "group": actor.group,
            "permissions": 0o600,
            "type": type_.value,
            "persistent": persistent,
            "bus": bus.value,
            "format": format_.value,
            "datastore": datastore,
            "state": state.value,
            "description": fields.pop("description", "") or "",
            "attributes": fields.pop("attributes", None) or {},
            "running_vms": 0,
            "cloning_ops": 0,
            "snapshots": 0,
            "flow_run_id": flow_run_id,
            "upload_id": upload_id,
            "version": 0,
            "created_at": now,
            "updated_at": now,
            **fields,
        }

    @staticmethod
    def _insert(conn: sa.Connection, values: dict, *, message: str) -> int:
        image_id = conn.execute(images.insert().values(**values)).inserted_primary_key[0]
        conn.execute(history.insert().values(
            image_id=image_id, from_state=None, to_state=values["state"],
            flow_run_id=values["flow_run_id"], at=values["created_at"], message=message,
        ))
        return image_id

    @staticmethod
    def _still_fits(conn: sa.Connection, datastore: str, limit_bytes: int | None, required: int) -> None:
        """The capacity rule again, inside the transaction that just inserted the new row."""
        if limit_bytes is None:
            return
        used = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(images.c.size), 0)).where(images.c.datastore == datastore)
        ).scalar_one()
        rules.check_capacity(datastore=datastore, limit=limit_bytes, used=int(used) - required, required=required)

    def register(
        self,
        *,
        actor: Actor,
        name: str,
        type_: ImageType,
        persistent: bool,
        bus: Bus,
        format_: DiskFormat,
        datastore: str,
        state: ImageState = ImageState.LOCKED,
        flow_run_id: str | None = None,
        upload_id: str | None = None,
        message: str = "registered",
        limit_bytes: int | None = None,
        **fields,
    ) -> Image:
        """Insert a new image (LOCKED while its file operation runs). Idempotent per upload_id:
        re-sending the same upload returns the image it already registered. With `limit_bytes`,
        an image whose `size` does not fit the datastore is refused and nothing is written."""
        if upload_id:
            existing = self.find_by_upload_id(upload_id)
            if existing is not None:
                return existing
        values = self._new_row(actor=actor, name=name, type_=type_, persistent=persistent, bus=bus,
                               format_=format_, datastore=datastore, state=state, flow_run_id=flow_run_id,
                               upload_id=upload_id, **fields)
        try:
            with self.engine.begin() as conn:
                image_id = self._insert(conn, values, message=message)
                self._still_fits(conn, datastore, limit_bytes, values.get("size") or 0)
        except SqlIntegrityError:
            if upload_id and (existing := self.find_by_upload_id(upload_id)):
                return existing
            self.check_name_free(actor.user, name)
            raise
        return self.get(image_id)

    def begin_clone(self, *, actor: Actor, source_id: int, name: str, datastore: str | None, persistent: bool,
                    description: str | None, object_id: str, flow_run_id: str | None = None,
                    limit_bytes: int | None = None, last_operation: dict | None = None) -> Image:
        """Register the clone target LOCKED (its `cloning_id` the source) and take the source
        (CLONING_OPS+1, its `cloning_id` the target) in one transaction: both happen or neither.
        Idempotent per object_id: a re-run finds the target it registered."""
        existing = self.find_by_upload_id(object_id)
        if existing is not None:
            rules.clone_resume(existing)
            return existing
        for _ in range(_MAX_CAS_ATTEMPTS):
            source = self.get(source_id)
            require(actor, source, Right.USE)
            inherited = rules.clone_target(source, persistent=persistent, description=description)
            values = self._new_row(actor=actor, name=name, datastore=datastore or source.datastore,
                                   state=ImageState.LOCKED, flow_run_id=flow_run_id, upload_id=object_id,
                                   last_operation=last_operation, **inherited)
            try:
                with self.engine.begin() as conn:
                    target_id = self._insert(conn, values, message=f"cloning from image {source.id}")
                    self._still_fits(conn, values["datastore"], limit_bytes, values.get("size") or 0)
                    self._cas(conn, source, rules.clone_source_acquire(source, target_id),
                              flow_run_id=flow_run_id, message=f"clone to image {target_id} started")
            except _Stale:
                continue
            except SqlIntegrityError:
                if (found := self.find_by_upload_id(object_id)) is not None:
                    rules.clone_resume(found)
                    return found
                self.check_name_free(actor.user, name)
                raise
            return self.get(target_id)
        raise ConcurrentChange(f"Image {source_id} kept changing under this clone request; try again.")

    def finish_clone(self, target_id: int, *, error: str | None, flow_run_id: str | None = None) -> Image | None:
        """End a clone (`error` None: success) with `rules.finish_clone`: the target unlocked or in
        ERROR and its source released, in one transaction. Idempotent: a finished clone is left alone."""

        def plan(read: Callable[[int], Image | None]) -> list[Move]:
            target = read(target_id)
            if target is None:
                return []
            source_id = rules.held_clone_source(target)
            source = read(source_id) if source_id is not None else None
            target_changes, source_changes = rules.finish_clone(target, source, error)
            outcome = "clone succeeded" if error is None else f"clone failed: {error}"
            moves = [Move(target, target_changes, outcome)] if target_changes else []
            if source is not None and source_changes:
                moves.append(Move(source, source_changes, f"clone to image {target_id} ended"))
            return moves

        self.transition_all(plan, flow_run_id=flow_run_id)
        return self.find(target_id)

    def find(self, image_id: int) -> Image | None:
        try:
            return self.get(image_id)
        except NotFound:
            return None

    def _cas(self, conn: sa.Connection, image: Image, changes: dict, *, flow_run_id: str | None,
             message: str) -> None:
        """One compare-and-set on the row's version, with its history row; raises _Stale if the
        row moved since `image` was read (the caller's transaction then rolls back)."""
        new_state: ImageState = changes["state"]
        values = {k: _to_column(v) for k, v in changes.items()}
        if new_state is not image.state:
            values["prev_state"] = image.state.value
        now = utcnow()
        values.update(version=image.version + 1, updated_at=now)
        if flow_run_id:
            values["flow_run_id"] = flow_run_id
        updated = conn.execute(
            images.update().where(images.c.id == image.id, images.c.version == image.version).values(**values)
        ).rowcount
        if updated != 1:
            raise _Stale()
        conn.execute(history.insert().values(
            image_id=image.id, from_state=image.state.value, to_state=new_state.value,
            flow_run_id=flow_run_id, at=now, message=message,
        ))

    def transition_all(self, plan: Callable[[Callable[[int], Image | None]], list["Move"]], *,
                       flow_run_id: str | None = None) -> list[Image]:
        """Apply several rules atomically: `plan(read)` reads the rows it needs through `read` (None
        for a missing row) and returns a Move per row to change (a rule may refuse: nothing is
        written). All compare-and-sets commit together, or the plan runs again on fresh rows."""
        for _ in range(_MAX_CAS_ATTEMPTS):
            moves = plan(self.find)
            try:
                with self.engine.begin() as conn:
                    for move in moves:
                        self._cas(conn, move.image, move.changes, flow_run_id=flow_run_id, message=move.message)
            except _Stale:
                continue
            except SqlIntegrityError:
                named = next((m for m in moves if m.changes.get("name_slot")), None)
                holder = self.name_owner(named.image.owner, named.changes["name_slot"]) if named else None
                raise Refused(
                    f"NAME is already taken by IMAGE {holder.id if holder else '?'}: choose another name."
                ) from None
            return [self.get(move.image.id) for move in moves]
        ids = ", ".join(str(m.image.id) for m in moves)
        raise ConcurrentChange(f"Image {ids} kept changing under this request; try again.")

    def transition(
        self,
        image_id: int,
        rule: Callable[..., dict],
        *args,
        flow_run_id: str | None = None,
        message: str = "",
        expect: Callable[[Image], None] | None = None,
        **kwargs,
    ) -> Image:
        """Apply `rule(image, *args, **kwargs)` atomically; `expect` may refuse first (e.g. a
        permission check) and is re-run on every attempt against the fresh row."""

        def plan(_read) -> list[Move]:
            image = self.get(image_id)
            if expect is not None:
                expect(image)
            return [Move(image, rule(image, *args, **kwargs), message or rule.__name__.replace("_", " "))]

        return self.transition_all(plan, flow_run_id=flow_run_id)[0]

    def remove(self, image_id: int, *, flow_run_id: str | None = None) -> None:
        """Drop the row of an image whose objects are gone (only from DELETE). A clone target
        force-deleted while it held its source lets go of it in the same transaction."""
        for _ in range(_MAX_CAS_ATTEMPTS):
            image = self.find(image_id)
            if image is None or image.state is not ImageState.DELETE:
                return
            source_id = rules.held_clone_source(image)
            source = self.find(source_id) if source_id is not None else None
            try:
                with self.engine.begin() as conn:
                    gone = conn.execute(images.delete().where(
                        images.c.id == image_id, images.c.state == ImageState.DELETE.value,
                        images.c.version == image.version,
                    )).rowcount
                    if gone != 1:
                        raise _Stale()
                    conn.execute(history.insert().values(
                        image_id=image_id, from_state=ImageState.DELETE.value, to_state="GONE",
                        flow_run_id=flow_run_id, at=utcnow(), message="objects removed, row deleted",
                    ))
                    if source is not None:
                        self._cas(conn, source, rules.clone_source_release(source), flow_run_id=flow_run_id,
                                  message=f"clone to image {image_id} ended: the clone was deleted")
            except _Stale:
                continue
            return
        raise ConcurrentChange(f"Image {image_id} kept changing while its row was removed; try again.")


class _Stale(Exception):
    """A compare-and-set lost the race: re-read and decide again."""


@dataclass(frozen=True)
class Move:
    """One row's part of a transition: the image as read, the changes a rule computed, the history message."""

    image: Image
    changes: dict
    message: str


@lru_cache
def open_catalog(url: str | None = None) -> Catalog:
    """The catalog of these settings (one engine per URL per process)."""
    return Catalog(url or get_settings().catalog_url)
