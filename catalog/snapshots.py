"""Snapshots of OS and DATABLOCK images: full copies of an image's bytes kept beside it in its
datastore, recorded here (number, name, time, size, sha256, object, parent).

Each operation on them (create, revert, delete, flatten) is a flow that first takes the image
READY -> LOCKED, owned by its run (`rules.snapshot_begin`), and ends it READY in one transaction
with the snapshot rows it changes (`rules.snapshot_end`); a failure records its error there and
leaves no row whose object is missing nor an object no row claims (`settle_failure`). The image's
`snapshots` counter is the number of its READY snapshots, written in the same transaction as them.

A snapshot counts against its datastore's capacity and its image owner's and group's quotas from
its insert (CREATING, under the accounting locks, before any byte is copied) until its row is gone.

Rights: MANAGE on the image for every operation, USE to list them; an image the caller may not
USE answers exactly as a missing one.

Every change to snapshot rows is written together with a compare-and-set of their image's row (the
plan reads both inside that transaction), so two operations on one image never both win.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Callable

import sqlalchemy as sa
from pydantic import Field

from catalog import rules
from catalog.model import HcxError, Image, ImageState, NotFound, Refused, utcnow
from catalog.permissions import Actor, Right, check_access
from catalog.requests import RequestedBy, _by_rule
from catalog.store import Catalog, Move, Reader, RowWrite, Step, dialect_insert, snapshot_numbers, snapshots


class SnapshotState(str, enum.Enum):
    CREATING = "CREATING"  # its object is being copied (counted already); gone again if the copy fails
    READY = "READY"


@dataclass(frozen=True)
class Snapshot:
    id: int
    image_id: int
    number: int
    name: str
    state: SnapshotState
    parent: int | None
    active: bool
    datastore: str
    size: int
    virtual_size: int | None
    sha256: str | None
    object: str
    etag: str | None
    flow_run_id: str | None
    created_at: datetime

    @property
    def label(self) -> str:
        return f"snapshot {self.number} ({self.name})"

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "state": self.state.value, "parent": self.parent,
                "active": self.active, "size": self.size, "virtual_size": self.virtual_size, "sha256": self.sha256,
                "object": self.object, "time": self.created_at.isoformat(), "image_id": self.image_id}


class Change(str, enum.Enum):
    """What a flow does with an existing snapshot."""

    REVERT = "revert"
    DELETE = "delete"
    FLATTEN = "flatten"

    @property
    def refused_as(self) -> str:
        """How a refusal names it: 'Cannot <this> image N ...'."""
        return {"revert": "revert", "delete": "delete a snapshot of", "flatten": "flatten"}[self.value]

    @property
    def asked_as(self) -> str:
        """How the history names it: '<this> snapshot N (NAME) asked by USER'."""
        return {"revert": "revert to", "delete": "deletion of", "flatten": "flatten to"}[self.value]


SnapshotName = Annotated[str, Field(min_length=1, max_length=rules.MAX_NAME), _by_rule(rules.validate_snapshot_name)]


class SnapshotRequest(RequestedBy):
    """A snapshot operation on an image: for create, the new snapshot's name; otherwise the
    snapshot it acts on, by name or number."""

    image_id: int = Field(ge=0)
    snapshot: str = Field(min_length=1, max_length=rules.MAX_NAME)


def _to_snapshot(row: sa.Row) -> Snapshot:
    data = dict(row._mapping)
    data["state"] = SnapshotState(data["state"])
    return Snapshot(**data)


# --- reading ----------------------------------------------------------------------------------

def _of_image(image_id: int) -> sa.Select:
    return sa.select(snapshots).where(snapshots.c.image_id == image_id).order_by(snapshots.c.number)


def snapshots_of(catalog: Catalog, image_id: int) -> list[Snapshot]:
    """Every snapshot row of an image (CREATING ones too), by number."""
    with catalog.engine.connect() as conn:
        return [_to_snapshot(r) for r in conn.execute(_of_image(image_id))]


def snapshots_in(catalog: Catalog, datastore: str) -> list[Snapshot]:
    """Every snapshot row kept in a datastore."""
    with catalog.engine.connect() as conn:
        rows = conn.execute(sa.select(snapshots).where(snapshots.c.datastore == datastore)
                            .order_by(snapshots.c.image_id, snapshots.c.number))
        return [_to_snapshot(r) for r in rows]


def _read_snapshots(read: Reader, image_id: int) -> list[Snapshot]:
    """The same, read inside a plan's transaction."""
    return [_to_snapshot(r) for r in read.rows(_of_image(image_id))]


def list_snapshots(catalog: Catalog, actor: Actor, image_id: int) -> list[Snapshot]:
    catalog.get_for(actor, image_id, Right.USE)
    return snapshots_of(catalog, image_id)


def resolve(found: list[Snapshot], image_id: int, ref: str) -> Snapshot:
    """The READY snapshot `ref` names: its number (digits) or its name."""
    for snapshot in found:
        if snapshot.state is SnapshotState.READY and (str(snapshot.number) == ref if ref.isdigit() else
                                                      snapshot.name == ref):
            return snapshot
    raise NotFound(f"Image {image_id} has no snapshot {ref!r}: `hcx-image snapshot-list {image_id}` shows them "
                   "(give a name or a number).")


def _ours(found: list[Snapshot], run_id: str | None) -> Snapshot | None:
    """The snapshot this run is creating."""
    return next((s for s in found if s.state is SnapshotState.CREATING and s.flow_run_id == run_id), None)


def _ready_count(found: list[Snapshot], *, without: set[int] = frozenset(), plus: int = 0) -> int:
    return sum(1 for s in found if s.state is SnapshotState.READY and s.number not in without) + plus


def _what(image: Image, name: str) -> str:
    return f"snapshot {name!r} of image {image.id}"


# --- checks made before a flow starts (the flow decides again atomically) ----------------------

def check_create(catalog: Catalog, actor: Actor, image_id: int, name: str, *, limit_bytes: int | None) -> Image:
    """Refuse a snapshot that breaks a rule or has no room, before anything is written."""
    image = catalog.get_for(actor, image_id, Right.MANAGE)
    rules.validate_snapshot_name(name)
    rules.snapshot_begin(image, "take a snapshot of", None)
    _check_name_free(snapshots_of(catalog, image_id), image, name)
    required = image.size or 0
    rules.check_capacity(datastore=image.datastore, limit=limit_bytes, used=catalog.used_bytes(image.datastore),
                         required=required, what=_what(image, name))
    catalog.check_quota(owner=image.owner, group=image.group, datastore=image.datastore, required_bytes=required,
                        new_images=0, what=_what(image, name))
    return image


def check_change(catalog: Catalog, actor: Actor, image_id: int, ref: str, change: Change, *,
                 limit_bytes: int | None) -> Snapshot:
    """Refuse a revert, delete or flatten that breaks a rule (or a revert that has no room to grow
    the image), before anything is written."""
    image = catalog.get_for(actor, image_id, Right.MANAGE)
    rules.snapshot_begin(image, change.refused_as, None)
    snapshot = resolve(snapshots_of(catalog, image_id), image_id, ref)
    if change is Change.REVERT and (growth := snapshot.size - (image.size or 0)) > 0:
        what = f"image {image.id} reverted to {snapshot.label}"
        rules.check_capacity(datastore=image.datastore, limit=limit_bytes, used=catalog.used_bytes(image.datastore),
                             required=growth, what=what)
        catalog.check_quota(owner=image.owner, group=image.group, datastore=image.datastore, required_bytes=growth,
                            new_images=0, what=what)
    return snapshot


def _check_name_free(found: list[Snapshot], image: Image, name: str) -> None:
    holder = next((s for s in found if s.name == name), None)
    if holder is not None:
        raise Refused(f"Image {image.id} already has a snapshot named {name!r} (number {holder.number}): "
                      "choose another name, or delete that snapshot first.")


# --- create -----------------------------------------------------------------------------------

def begin_create(catalog: Catalog, actor: Actor, image_id: int, name: str, *, object_uri: str,
                 limit_bytes: int | None, run_id: str | None) -> Snapshot:
    """The image LOCKED by `run_id` and its new snapshot's row (CREATING, at `object_uri`, its bytes
    charged to capacity and quotas under their locks), in one transaction. Run again by the same
    run, it hands back the row it made."""
    catalog.get_for(actor, image_id, Right.MANAGE)

    def plan(read: Reader) -> list[Step]:
        image = read(image_id) or catalog.get(image_id)
        check_access(actor, image, Right.MANAGE)
        found = _read_snapshots(read, image_id)
        if image.flow_run_id == run_id and _ours(found, run_id) is not None:
            return []  # this run made it already (its task was retried)
        rules.validate_snapshot_name(name)
        changes = rules.snapshot_begin(image, "take a snapshot of", run_id)
        _check_name_free(found, image, name)

        def insert(conn: sa.Connection) -> None:
            held = conn.execute(sa.select(snapshot_numbers.c.next_number)
                                .where(snapshot_numbers.c.image_id == image_id)).scalar_one_or_none()
            number = held or 0
            conn.execute(dialect_insert(conn, snapshot_numbers).values(image_id=image_id, next_number=number + 1)
                         .on_conflict_do_update(index_elements=["image_id"], set_={"next_number": number + 1}))
            catalog.charge_bytes(conn, image, image.size or 0, limit_bytes=limit_bytes, what=_what(image, name))
            active = next((s.number for s in found if s.active), None)
            conn.execute(snapshots.insert().values(
                image_id=image_id, number=number, name=name, state=SnapshotState.CREATING.value, parent=active,
                active=False, datastore=image.datastore, size=image.size or 0, virtual_size=image.virtual_size,
                sha256=image.sha256, object=object_uri, etag=None, flow_run_id=run_id, created_at=utcnow()))

        return [Move(image, changes, f"snapshot {name!r} being taken, asked by {actor.user}"), RowWrite(image, insert)]

    catalog.commit(plan, writer=run_id)
    made = _ours(snapshots_of(catalog, image_id), run_id)
    if made is None:
        raise HcxError(f"Image {image_id}: the snapshot row of flow run {run_id} is not there after its insert.")
    return made


def _finish(catalog: Catalog, image_id: int, run_id: str | None,
            steps: Callable[[Image, list[Snapshot]], list[Step]]) -> Image | None:
    """The end of a snapshot operation, in one transaction: `steps` of the image (owned by `run_id`)
    and its snapshots; nothing when the image is gone or no longer LOCKED (finished already)."""

    def plan(read: Reader) -> list[Step]:
        image = read(image_id)
        if image is None:
            return []
        rules.owned_by(image, run_id)
        if image.state is not ImageState.LOCKED:
            return []
        return steps(image, _read_snapshots(read, image_id))

    catalog.commit(plan, writer=run_id)
    return catalog.find(image_id)


def finish_create(catalog: Catalog, image_id: int, *, etag: str, run_id: str | None) -> Image | None:
    """The snapshot's object is complete (`etag`): its row READY and the image's active one, the
    image READY with one more snapshot, in one transaction. Idempotent."""

    def steps(image: Image, found: list[Snapshot]) -> list[Step]:
        made = _ours(found, run_id)
        if made is None:
            return []  # finished already

        def mark_ready(conn: sa.Connection) -> None:
            conn.execute(snapshots.update().where(snapshots.c.image_id == image_id).values(active=False))
            conn.execute(snapshots.update().where(snapshots.c.id == made.id)
                         .values(state=SnapshotState.READY.value, etag=etag, active=True))

        changes = rules.snapshot_end(image, snapshots=_ready_count(found, plus=1))
        return [Move(image, changes, f"{made.label} taken", run_id), RowWrite(image, mark_ready)]

    return _finish(catalog, image_id, run_id, steps)


# --- revert, delete, flatten ------------------------------------------------------------------

def begin_change(catalog: Catalog, actor: Actor, image_id: int, ref: str, change: Change, *,
                 limit_bytes: int | None = None, run_id: str | None) -> Snapshot:
    """READY -> LOCKED by `run_id` for a revert, delete or flatten of the snapshot `ref`; refused
    (nothing written) when a rule says no or the snapshot does not exist, or for a revert to a
    larger snapshot, when the datastore (`limit_bytes`) or a quota has no room for the difference
    (checked under their accounting locks). Run again by the same run, it hands back the snapshot."""
    image = catalog.get_for(actor, image_id, Right.MANAGE)
    if image.state is ImageState.LOCKED and image.flow_run_id == run_id:
        return resolve(snapshots_of(catalog, image_id), image_id, ref)  # this run locked it already

    def plan(read: Reader) -> list[Step]:
        image = read(image_id) or catalog.get(image_id)
        check_access(actor, image, Right.MANAGE)
        changes = rules.snapshot_begin(image, change.refused_as, run_id)
        snapshot = resolve(_read_snapshots(read, image_id), image_id, ref)
        steps: list[Step] = [Move(image, changes, f"{change.asked_as} {snapshot.label} asked by {actor.user}")]
        # Flatten never grows: the image takes one snapshot's size and every snapshot goes.
        if change is Change.REVERT and (growth := snapshot.size - (image.size or 0)) > 0:
            steps.append(RowWrite(image, lambda conn: catalog.charge_bytes(
                conn, image, growth, limit_bytes=limit_bytes, what=f"image {image.id} reverted to {snapshot.label}")))
        return steps

    catalog.commit(plan, writer=run_id)
    return resolve(snapshots_of(catalog, image_id), image_id, ref)


def record_content(catalog: Catalog, image_id: int, number: int, *, etag: str, run_id: str | None) -> Image:
    """The image's object now holds snapshot `number`'s bytes (`etag`): its sha256 and sizes are
    the snapshot's (the image stays LOCKED). Written before any snapshot object is removed."""
    snapshot = _numbered(snapshots_of(catalog, image_id), image_id, number)
    return catalog.transition(image_id, rules.record, sha256=snapshot.sha256, size=snapshot.size,
                              virtual_size=snapshot.virtual_size, source_etag=etag, owner=run_id, writer=run_id,
                              message=f"bytes of {snapshot.label} copied over the image")


def finish_revert(catalog: Catalog, image_id: int, number: int, *, run_id: str | None) -> Image | None:
    """After `record_content`: the snapshot is the image's active one, the image READY. Idempotent."""

    def steps(image: Image, found: list[Snapshot]) -> list[Step]:
        snapshot = _numbered(found, image_id, number)
        return [Move(image, rules.snapshot_end(image), f"reverted to {snapshot.label}", run_id),
                RowWrite(image, lambda conn: _make_active(conn, image_id, number))]

    return _finish(catalog, image_id, run_id, steps)


def finish_delete(catalog: Catalog, image_id: int, number: int, *, run_id: str | None) -> Image | None:
    """The snapshot's object is gone: its row goes (its children take its parent), the image READY
    with one snapshot less, in one transaction. Idempotent."""

    def steps(image: Image, found: list[Snapshot]) -> list[Step]:
        gone = [s for s in found if s.number == number]
        changes = rules.snapshot_end(image, snapshots=_ready_count(found, without={number}))
        return [Move(image, changes, f"snapshot {number} deleted", run_id),
                RowWrite(image, lambda conn: _drop_rows(conn, image_id, gone))]

    return _finish(catalog, image_id, run_id, steps)


def finish_flatten(catalog: Catalog, image_id: int, number: int, *, run_id: str | None) -> Image | None:
    """After `record_content` and once every snapshot object is gone: every snapshot row goes, the
    image READY with none, in one transaction. Idempotent."""

    def steps(image: Image, found: list[Snapshot]) -> list[Step]:
        return [Move(image, rules.snapshot_end(image, snapshots=0),
                     f"flattened to snapshot {number}: all {len(found)} snapshots removed", run_id),
                RowWrite(image, lambda conn: _drop_rows(conn, image_id, found))]

    return _finish(catalog, image_id, run_id, steps)


def settle_failure(catalog: Catalog, image_id: int, reason: str, *, run_id: str, missing: set[int],
                   content: tuple[int, str] | None) -> Image | None:
    """A snapshot operation of `run_id` failed: the snapshot it was creating goes (its object was
    removed first), READY snapshots whose objects are gone (`missing`, by number) go, and when the
    image's object already holds a snapshot's bytes (`content`: its number and the object's ETag)
    the image records them; the image is READY with the error, all in one transaction. Only while
    the run still holds the image LOCKED; otherwise nothing is done."""

    def plan(read: Reader) -> list[Step]:
        image = read(image_id)
        if image is None or image.flow_run_id != run_id or image.state is not ImageState.LOCKED:
            return []
        found = _read_snapshots(read, image_id)
        creating = _ours(found, run_id)
        gone = [s for s in found if s.number in missing or s == creating]
        recorded: dict[str, Any] = {}
        if content is not None and (source := next((s for s in found if s.number == content[0]), None)):
            recorded = {"sha256": source.sha256, "size": source.size, "virtual_size": source.virtual_size,
                        "source_etag": content[1]}
        changes = rules.snapshot_end(image, reason, snapshots=_ready_count(found, without={s.number for s in gone}),
                                     **recorded)
        steps: list[Step] = [Move(image, changes, f"snapshot operation failed: {reason}", run_id)]
        if gone:
            steps.append(RowWrite(image, lambda conn: _drop_rows(conn, image_id, gone)))
        return steps

    catalog.commit(plan, writer=run_id)
    return catalog.find(image_id)


def _numbered(found: list[Snapshot], image_id: int, number: int) -> Snapshot:
    snapshot = next((s for s in found if s.number == number), None)
    if snapshot is None:
        raise NotFound(f"Image {image_id} has no snapshot {number} any more.")
    return snapshot


def _make_active(conn: sa.Connection, image_id: int, number: int | None) -> None:
    conn.execute(snapshots.update().where(snapshots.c.image_id == image_id)
                 .values(active=snapshots.c.number == number if number is not None else False))


def _drop_rows(conn: sa.Connection, image_id: int, gone: list[Snapshot]) -> None:
    """Remove these rows; a child of a removed snapshot takes its parent, and if the image's bytes
    came from a removed one, they now come from its parent."""
    numbers = {s.number for s in gone}
    parent_of = {s.number: s.parent for s in gone}

    def surviving(number: int | None) -> int | None:
        while number in numbers:
            number = parent_of[number]
        return number

    conn.execute(snapshots.delete().where(snapshots.c.image_id == image_id, snapshots.c.number.in_(numbers)))
    for removed in gone:
        conn.execute(snapshots.update().where(snapshots.c.image_id == image_id, snapshots.c.parent == removed.number)
                     .values(parent=surviving(removed.number)))
    if any(s.active for s in gone) and (heir := surviving(next(s.number for s in gone if s.active))) is not None:
        _make_active(conn, image_id, heir)
