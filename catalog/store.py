"""The image state table (SQLite by default, PostgreSQL by URL) and its one way to change state.

Every state change goes through `Catalog.transition`: read the row, let a rule of
`catalog.rules` compute the new fields, then `UPDATE ... WHERE id = ? AND version = ?` together
with the history row, in one transaction. Two racing requests can never both win: the loser
re-reads and the rule decides again (it may now refuse).
"""

from __future__ import annotations

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
        **fields,
    ) -> Image:
        """Insert a new image (LOCKED while its file operation runs). Idempotent per upload_id:
        re-sending the same upload returns the image it already registered."""
        if upload_id:
            existing = self.find_by_upload_id(upload_id)
            if existing is not None:
                return existing
        rules.validate_new_image(type_=type_, persistent=persistent)
        rules.validate_name(name)
        now = utcnow()
        values = {
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
        try:
            with self.engine.begin() as conn:
                image_id = conn.execute(images.insert().values(**values)).inserted_primary_key[0]
                conn.execute(history.insert().values(
                    image_id=image_id, from_state=None, to_state=state.value,
                    flow_run_id=flow_run_id, at=now, message=message,
                ))
        except SqlIntegrityError:
            if upload_id and (existing := self.find_by_upload_id(upload_id)):
                return existing
            self.check_name_free(actor.user, name)
            raise
        return self.get(image_id)

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
        for _ in range(_MAX_CAS_ATTEMPTS):
            image = self.get(image_id)
            if expect is not None:
                expect(image)
            changes = rule(image, *args, **kwargs)
            new_state: ImageState = changes["state"]
            values = {k: _to_column(v) for k, v in changes.items()}
            if new_state is not image.state:
                values["prev_state"] = image.state.value
            now = utcnow()
            values.update(version=image.version + 1, updated_at=now)
            if flow_run_id:
                values["flow_run_id"] = flow_run_id
            try:
                with self.engine.begin() as conn:
                    updated = conn.execute(
                        images.update()
                        .where(images.c.id == image_id, images.c.version == image.version)
                        .values(**values)
                    ).rowcount
                    if updated == 1:
                        conn.execute(history.insert().values(
                            image_id=image_id, from_state=image.state.value, to_state=new_state.value,
                            flow_run_id=flow_run_id, at=now,
                            message=message or rule.__name__.replace("_", " "),
                        ))
            except SqlIntegrityError:
                holder = self.name_owner(image.owner, changes.get("name", image.name))
                raise Refused(
                    f"NAME is already taken by IMAGE {holder.id if holder else '?'}: choose another name."
                ) from None
            if updated == 1:
                return self.get(image_id)
        raise ConcurrentChange(f"Image {image_id} kept changing under this request; try again.")

    def remove(self, image_id: int, *, flow_run_id: str | None = None) -> None:
        """Drop the row of an image whose objects are gone (only from DELETE)."""
        with self.engine.begin() as conn:
            gone = conn.execute(
                images.delete().where(images.c.id == image_id, images.c.state == ImageState.DELETE.value)
            ).rowcount
            if gone:
                conn.execute(history.insert().values(
                    image_id=image_id, from_state=ImageState.DELETE.value, to_state="GONE",
                    flow_run_id=flow_run_id, at=utcnow(), message="objects removed, row deleted",
                ))


@lru_cache
def open_catalog(url: str | None = None) -> Catalog:
    """The catalog of these settings (one engine per URL per process)."""
    return Catalog(url or get_settings().catalog_url)
