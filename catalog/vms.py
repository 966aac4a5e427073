"""A minimal VM record: only what image semantics need (image-rules.md, "VM acquires image").

A VM is owned like an image (a user and a group) and seen only by its owner and administrators:
anyone else's VM answers exactly as a missing one. It uses images as disks, needing USE on each.
Its template is checked before anything moves (`check_template`). Acquiring and releasing images
(`rules.vm_acquire` / `rules.vm_release`) happens in the same transaction as the VM's disk rows
(`Catalog.commit_rows`): an image's RUNNING_VMS always equals the disk rows that hold it. The VM
row is locked (SELECT ... FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers)
by every plan that changes it, and each image moves by compare-and-set, so racing requests on one
persistent image can never both win.

A disk is a `link` to a persistent image's own object, or a `copy` of a non-persistent one in the
system datastore, made by the prolog flow; the epilog flow deletes copies and releases the images.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from catalog import rules
from catalog.model import HcxError, Image, ImageState, ImageType, NotFound, Refused, missing_image, utcnow
from catalog.permissions import Actor, Right, check_access
from catalog.store import Catalog, Move, Reader, Step, ensure_tables, metadata


class VmState(str, enum.Enum):
    PENDING = "PENDING"  # disks being made (or waiting on a LOCKED image)
    RUNNING = "RUNNING"
    EPILOG = "EPILOG"  # terminating: copies being deleted, images released
    TERMINATED = "TERMINATED"  # nothing held any more; its name is free
    FAILED = "FAILED"  # its prolog failed (or an image it waited on went to ERROR): nothing held


class DiskMode(str, enum.Enum):
    LINK = "link"  # the persistent image's own object: writes land in the image
    COPY = "copy"  # a full copy of a non-persistent image in the system datastore, destroyed with the VM


class DiskState(str, enum.Enum):
    PENDING = "PENDING"  # acquired; the prolog has not made it yet
    WAITING = "WAITING"  # its image is LOCKED (being written): the prolog waits for it
    READY = "READY"
    DETACHING = "DETACHING"  # the epilog deletes its copy, then releases its image


# States in which a VM holds its disks (and the images' counters).
_HOLDING = (VmState.PENDING, VmState.RUNNING, VmState.EPILOG)

vms = sa.Table(
    "vms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("name_slot", sa.String(255), nullable=True),  # NULL once TERMINATED: the name is free
    sa.Column("owner", sa.String(128), nullable=False),
    sa.Column("group", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("container", sa.Boolean, nullable=False, default=False),
    sa.Column("release_failed", sa.Boolean, nullable=False, default=False),  # terminate --failed
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("owner", "name_slot", name="uq_vms_owner_name"),
    sqlite_autoincrement=True,
)

vm_disks = sa.Table(
    "vm_disks",
    metadata,
    sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id"), primary_key=True),
    sa.Column("image_id", sa.Integer, primary_key=True, index=True),
    sa.Column("image_type", sa.String(16), nullable=False),
    sa.Column("mode", sa.String(8), nullable=False),
    sa.Column("datastore", sa.String(128)),  # where `object` lies (the image's, or the system datastore)
    sa.Column("object", sa.Text),  # s3://bucket/key: recorded before a copy starts, so the epilog finds it
    sa.Column("state", sa.String(16), nullable=False),
)


@dataclass(frozen=True)
class VmDisk:
    image_id: int
    image_type: ImageType
    mode: DiskMode
    datastore: str | None
    object: str | None
    state: DiskState

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "type": self.image_type.value, "mode": self.mode.value,
                "datastore": self.datastore, "object": self.object, "state": self.state.value}


@dataclass(frozen=True)
class Vm:
    id: int
    name: str
    owner: str
    group: str
    state: VmState
    container: bool
    release_failed: bool
    error: str | None
    created_at: datetime
    updated_at: datetime
    disks: tuple[VmDisk, ...] = ()

    def disk(self, image_id: int) -> VmDisk | None:
        return next((d for d in self.disks if d.image_id == image_id), None)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "owner": self.owner, "group": self.group,
                "state": self.state.value, "container": self.container, "error": self.error,
                "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
                "disks": [d.to_dict() for d in self.disks]}


def missing_vm(name: str | int) -> NotFound:
    """What a missing VM answers, and one the caller may not see (the same words)."""
    return NotFound(f"VM {name} does not exist: `hcx-image vm list` shows your VMs.")


def _ready(catalog: Catalog) -> Catalog:
    """The catalog, with the VM tables."""
    ensure_tables(catalog.engine, vms, vm_disks)
    return catalog


# --- reading ---------------------------------------------------------------------------------

def _read(conn: sa.Connection, vm_id: int, *, lock: bool = False) -> Vm | None:
    query = sa.select(vms).where(vms.c.id == vm_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        return None
    disks = conn.execute(sa.select(vm_disks).where(vm_disks.c.vm_id == vm_id).order_by(vm_disks.c.image_id))
    return _to_vm(row, [_to_disk(d) for d in disks])


def _to_vm(row: sa.Row, disks: list[VmDisk]) -> Vm:
    data = dict(row._mapping)
    data.pop("name_slot")
    data["state"] = VmState(data["state"])
    return Vm(**data, disks=tuple(disks))


def _to_disk(row: sa.Row) -> VmDisk:
    return VmDisk(image_id=row.image_id, image_type=ImageType(row.image_type), mode=DiskMode(row.mode),
                  datastore=row.datastore, object=row.object, state=DiskState(row.state))


def find(catalog: Catalog, vm_id: int) -> Vm | None:
    with _ready(catalog).engine.connect() as conn:
        return _read(conn, vm_id)


def get(catalog: Catalog, vm_id: int) -> Vm:
    if (vm := find(catalog, vm_id)) is None:
        raise missing_vm(vm_id)
    return vm


def _visible(actor: Actor, vm: Vm) -> bool:
    return actor.is_admin or vm.owner == actor.user


def by_name(catalog: Catalog, actor: Actor, name: str) -> Vm:
    """The actor's VM of that name (a terminated one no longer holds it)."""
    with _ready(catalog).engine.connect() as conn:
        vm_id = conn.execute(sa.select(vms.c.id).where(vms.c.owner == actor.user, vms.c.name_slot == name)).scalar()
        vm = _read(conn, vm_id) if vm_id is not None else None
    if vm is None or not _visible(actor, vm):
        raise missing_vm(name)
    return vm


def list_vms(catalog: Catalog, actor: Actor, *, terminated: bool = False) -> list[Vm]:
    """The actor's VMs (administrators: everyone's), terminated ones only when asked."""
    query = sa.select(vms.c.id).order_by(vms.c.id)
    if not actor.is_admin:
        query = query.where(vms.c.owner == actor.user)
    if not terminated:
        query = query.where(vms.c.state != VmState.TERMINATED.value)
    with _ready(catalog).engine.connect() as conn:
        return [_read(conn, vm_id) for vm_id in conn.execute(query).scalars().all()]


def vms_of_image(catalog: Catalog, image_id: int) -> list[int]:
    """Ids of the VMs holding a disk of this image."""
    with _ready(catalog).engine.connect() as conn:
        return list(conn.execute(sa.select(vm_disks.c.vm_id).where(vm_disks.c.image_id == image_id)).scalars())


# --- the template rules, before anything moves -----------------------------------------------

def check_template(types: dict[int, ImageType], *, container: bool) -> None:
    """The disks a VM would have (image id -> type): exactly one OS disk, at most one CDROM, no
    DATABLOCK on a container. Each refusal names its rule."""
    of_type = {t: sorted(i for i, it in types.items() if it is t) for t in ImageType}
    oses, cdroms, datablocks = of_type[ImageType.OS], of_type[ImageType.CDROM], of_type[ImageType.DATABLOCK]
    if len(oses) != 1:
        found = f"images {', '.join(map(str, oses))} are OS images" if oses else "none is an OS image"
        raise Refused(f"Rule 'exactly one OS disk': a VM needs exactly one OS disk, and {found}. "
                      "Give exactly one --disk of type OS.")
    if len(cdroms) > 1:
        raise Refused(f"Rule 'at most one CDROM': images {', '.join(map(str, cdroms))} are all CDROMs; "
                      "give at most one.")
    if container and datablocks:
        raise Refused(f"Rule 'no DATABLOCK on a container': a container cannot use DATABLOCK images, and "
                      f"image{'s' if len(datablocks) > 1 else ''} {', '.join(map(str, datablocks))} "
                      f"{'are' if len(datablocks) > 1 else 'is'}; drop them or create a VM without --container.")


def validate_vm_name(name: str) -> None:
    """A VM's name follows the rules of an image's (`rules.validate_name`), said of a VM, and has
    no '/': it is a segment of the API's paths (/vms/NAME/terminate)."""
    try:
        rules.validate_name(name)
    except Refused as exc:
        raise Refused(str(exc).replace("Invalid image name", "Invalid VM name", 1)) from None
    if "/" in name:
        raise Refused(f"Invalid VM name {name[:40]!r}: it contains '/'; use a name without it.")


def _check_distinct(image_ids: list[int]) -> None:
    repeated = sorted({i for i in image_ids if image_ids.count(i) > 1})
    if repeated:
        raise Refused(f"Image {', '.join(map(str, repeated))} is given more than once: a VM uses an image as one disk.")


def _usable(read: Reader, actor: Actor, image_id: int) -> Image:
    image = read(image_id)
    if image is None:
        raise missing_image(image_id)
    check_access(actor, image, Right.USE)  # an image the actor may not see answers as a missing one
    return image


def _disk_row(vm_id: int, image: Image) -> dict:
    mode = DiskMode.LINK if image.persistent else DiskMode.COPY
    # A link is the image's own object from the start; a copy's place is recorded by the prolog
    # before its first byte is written.
    return {"vm_id": vm_id, "image_id": image.id, "image_type": image.type.value, "mode": mode.value,
            "datastore": image.datastore if mode is DiskMode.LINK else None,
            "object": image.source if mode is DiskMode.LINK else None, "state": DiskState.PENDING.value}


def _vm_name_taken(catalog: Catalog, actor: Actor, name: str) -> Refused:
    with catalog.engine.connect() as conn:
        holder = conn.execute(sa.select(vms.c.id).where(vms.c.owner == actor.user, vms.c.name_slot == name)).scalar()
    return Refused(f"VM name {name!r} is already taken by VM {holder}: choose another name, or terminate VM {holder}.")


# --- creating, attaching: acquire ------------------------------------------------------------

def create(catalog: Catalog, actor: Actor, name: str, image_ids: list[int], *, container: bool = False,
           writer: str | None = None) -> Vm:
    """A new VM, PENDING, holding its images (USE on each): the template rules checked, then each
    image acquired (`rules.vm_acquire`: READY -> USED/USED_PERS, LOCKED -> LOCKED_USED*), the VM
    and its disk rows written in the same transaction. Any refusal changes nothing."""
    validate_vm_name(name)
    if not image_ids:
        raise Refused("A VM needs disks: give --disk ID, one of them an OS image.")
    _check_distinct(image_ids)
    created: list[int] = []

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        created.clear()
        images = [_usable(read, actor, i) for i in image_ids]
        check_template({i.id: i.type for i in images}, container=container)
        changes = [rules.vm_acquire(image) for image in images]  # the rules' refusals, before any write
        now = utcnow()
        vm_id = conn.execute(vms.insert().values(
            name=name, name_slot=name, owner=actor.user, group=actor.group, state=VmState.PENDING.value,
            container=container, release_failed=False, error=None, created_at=now, updated_at=now,
        )).inserted_primary_key[0]
        conn.execute(vm_disks.insert(), [_disk_row(vm_id, image) for image in images])
        created.append(vm_id)
        # Image rows are written in id order, as every VM plan writes them: two VMs taking the
        # same images never wait on each other's rows (a deadlock on PostgreSQL).
        return [Move(image, change, f"acquired by VM {vm_id} ({name}) of {actor.user}")
                for image, change in sorted(zip(images, changes), key=lambda pair: pair[0].id)]

    try:
        _ready(catalog).commit_rows(plan, writer=writer)
    except SqlIntegrityError:
        raise _vm_name_taken(catalog, actor, name) from None
    return get(catalog, created[0])


def _locked_vm(conn: sa.Connection, actor: Actor | None, vm_id: int) -> Vm:
    vm = _read(conn, vm_id, lock=True)
    if vm is None or (actor is not None and not _visible(actor, vm)):
        raise missing_vm(vm_id)
    return vm


def _refuse_vm_state(vm: Vm, action: str, needed: str) -> Refused:
    return Refused(f"Cannot {action} VM {vm.name}: it is {vm.state.value}, and it must be {needed}.")


def attach(catalog: Catalog, actor: Actor, vm_id: int, image_id: int, *, writer: str | None = None) -> Vm:
    """Hot-attach an image to a RUNNING VM: the template rules on the disks it would then have,
    `rules.vm_acquire(hot_attach=True)` (a LOCKED image is refused), a PENDING disk row for the
    prolog to make, in one transaction."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _locked_vm(conn, actor, vm_id)
        image = _usable(read, actor, image_id)
        if vm.state is not VmState.RUNNING:
            raise _refuse_vm_state(vm, f"attach image {image_id} to", "RUNNING")
        if vm.disk(image_id) is not None:
            raise Refused(f"Image {image_id} is already a disk of VM {vm.name}.")
        check_template({**{d.image_id: d.image_type for d in vm.disks}, image.id: image.type}, container=vm.container)
        change = rules.vm_acquire(image, hot_attach=True)
        conn.execute(vm_disks.insert().values(**_disk_row(vm.id, image)))
        _touch(conn, vm.id)
        return [Move(image, change, f"attached to VM {vm.id} ({vm.name}) by {actor.user}")]

    _ready(catalog).commit_rows(plan, writer=writer)
    return get(catalog, vm_id)


# --- terminating, detaching: the epilog's start -------------------------------------------------

def begin_terminate(catalog: Catalog, actor: Actor, vm_id: int, *, failed: bool = False) -> Vm:
    """-> EPILOG, every disk DETACHING: the epilog flow then deletes the copies and releases the
    images (`failed`: the VM failed while active, its persistent images go to ERROR). A VM whose
    epilog failed may be terminated again: the epilog carries on."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _locked_vm(conn, actor, vm_id)
        if vm.state is VmState.TERMINATED:
            raise _refuse_vm_state(vm, "terminate", "PENDING, RUNNING, FAILED or EPILOG")
        conn.execute(vms.update().where(vms.c.id == vm.id).values(
            state=VmState.EPILOG.value, release_failed=vm.release_failed or failed, updated_at=utcnow()))
        conn.execute(vm_disks.update().where(vm_disks.c.vm_id == vm.id).values(state=DiskState.DETACHING.value))
        return []

    _ready(catalog).commit_rows(plan)
    return get(catalog, vm_id)


def begin_detach(catalog: Catalog, actor: Actor, vm_id: int, image_id: int) -> Vm:
    """A READY disk of a RUNNING VM -> DETACHING (the epilog flow then releases it). The OS disk
    stays: a VM needs exactly one."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _locked_vm(conn, actor, vm_id)
        if vm.state is not VmState.RUNNING:
            raise _refuse_vm_state(vm, f"detach image {image_id} from", "RUNNING")
        disk = vm.disk(image_id)
        if disk is None:
            raise Refused(f"Image {image_id} is not a disk of VM {vm.name}: `hcx-image vm show {vm.name}` lists them.")
        if disk.image_type is ImageType.OS:
            raise Refused(f"Rule 'exactly one OS disk': image {image_id} is the OS disk of VM {vm.name} and cannot "
                          "be detached; terminate the VM instead.")
        if disk.state not in (DiskState.READY, DiskState.DETACHING):  # DETACHING: a failed detach, again
            raise Refused(f"Disk of image {image_id} on VM {vm.name} is {disk.state.value}: only a READY disk can be "
                          "detached; wait for it.")
        _set_disk(conn, vm.id, image_id, DiskState.DETACHING)
        return []

    _ready(catalog).commit_rows(plan)
    return get(catalog, vm_id)


# --- what the prolog and epilog flows record ---------------------------------------------------

def _touch(conn: sa.Connection, vm_id: int, **values) -> None:
    conn.execute(vms.update().where(vms.c.id == vm_id).values(updated_at=utcnow(), **values))


def _set_disk(conn: sa.Connection, vm_id: int, image_id: int, state: DiskState, **values) -> None:
    conn.execute(vm_disks.update().where(vm_disks.c.vm_id == vm_id, vm_disks.c.image_id == image_id)
                 .values(state=state.value, **values))


def wanted_disk(vm: Vm, image_id: int) -> VmDisk | None:
    """The disk the prolog is to make, while the VM still wants it (None: terminated or detached meanwhile)."""
    disk = vm.disk(image_id)
    if vm.state not in (VmState.PENDING, VmState.RUNNING) or disk is None or disk.state is DiskState.DETACHING:
        return None
    return disk


def mark_waiting(catalog: Catalog, vm_id: int, image_id: int) -> bool:
    """The prolog found the disk's image LOCKED: the disk WAITING. False: the VM no longer wants it."""
    return _record_disk(catalog, vm_id, image_id, DiskState.WAITING)


def record_copy_target(catalog: Catalog, vm_id: int, image_id: int, *, datastore: str, object_uri: str) -> bool:
    """Where the copy will lie, recorded before its first byte (the epilog deletes whatever is there)."""
    return _record_disk(catalog, vm_id, image_id, DiskState.PENDING, datastore=datastore, object=object_uri)


def disk_ready(catalog: Catalog, vm_id: int, image_id: int, **where: str) -> bool:
    """The disk is made (a link: `where` is the image's object now that it is settled; a copy:
    verified). False: the VM no longer wants it (terminated meanwhile): the caller removes what it made."""
    return _record_disk(catalog, vm_id, image_id, DiskState.READY, **where)


def _record_disk(catalog: Catalog, vm_id: int, image_id: int, state: DiskState, **values) -> bool:
    recorded: list[bool] = []

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        recorded.clear()
        vm = _read(conn, vm_id, lock=True)
        if vm is None or wanted_disk(vm, image_id) is None:
            recorded.append(False)
            return []
        _set_disk(conn, vm_id, image_id, state, **values)
        recorded.append(True)
        return []

    _ready(catalog).commit_rows(plan)
    return recorded[0]


def start(catalog: Catalog, vm_id: int) -> Vm:
    """PENDING -> RUNNING once every disk is READY (a VM terminated meanwhile is left alone)."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _read(conn, vm_id, lock=True)
        if vm is not None and vm.state is VmState.PENDING and all(d.state is DiskState.READY for d in vm.disks):
            _touch(conn, vm_id, state=VmState.RUNNING.value, error=None)
        return []

    _ready(catalog).commit_rows(plan)
    return get(catalog, vm_id)


def _release(vm: Vm, disk: VmDisk, image: Image | None, *, failed: bool, why: str) -> list[Step]:
    """The image of a disk let go (`rules.vm_release`); `failed` only matters for a persistent
    image, whose data the VM wrote in place."""
    if image is None:  # cannot happen while the disk holds it (delete is refused); nothing to move
        return []
    changes = rules.vm_release(image, failed=failed and disk.mode is DiskMode.LINK)
    return [Move(image, changes, f"released by VM {vm.id} ({vm.name}): {why}")]


def _drop_disk(conn: sa.Connection, vm_id: int, image_id: int) -> None:
    conn.execute(vm_disks.delete().where(vm_disks.c.vm_id == vm_id, vm_disks.c.image_id == image_id))


def release_disk(catalog: Catalog, vm_id: int, image_id: int, *, writer: str | None = None) -> None:
    """A DETACHING disk whose copy is gone: its row removed and its image released, together.
    Idempotent: a disk already released is left alone."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _read(conn, vm_id, lock=True)
        disk = vm.disk(image_id) if vm is not None else None
        if disk is None or disk.state is not DiskState.DETACHING:
            return []
        _drop_disk(conn, vm_id, image_id)
        _touch(conn, vm_id)
        why = "terminated" if vm.state is VmState.EPILOG else "detached"
        failed = vm.release_failed and vm.state is VmState.EPILOG
        return _release(vm, disk, read(image_id), failed=failed, why=why + (" (failed)" if failed else ""))

    _ready(catalog).commit_rows(plan, writer=writer)


def finish_terminate(catalog: Catalog, vm_id: int) -> Vm:
    """EPILOG with every disk released -> TERMINATED, its name free."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _read(conn, vm_id, lock=True)
        if vm is None or vm.state is not VmState.EPILOG:
            return []
        if vm.disks:
            raise HcxError(f"VM {vm.name} still holds images {', '.join(str(d.image_id) for d in vm.disks)}: "
                           "terminate it again to release them.")
        _touch(conn, vm_id, state=VmState.TERMINATED.value, name_slot=None, error=None)
        return []

    _ready(catalog).commit_rows(plan)
    return get(catalog, vm_id)


def fail(catalog: Catalog, vm_id: int, image_ids: list[int] | None, reason: str, *,
         writer: str | None = None) -> Vm | None:
    """The prolog failed for these disks (None: all), its copies already removed: each such
    disk's row dropped and its image released (not as failed: the VM never ran on it), together.
    A PENDING VM goes FAILED with the reason, releasing every disk; a RUNNING one (a failed attach)
    keeps its other disks and records the reason. Idempotent."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        vm = _read(conn, vm_id, lock=True)
        if vm is None or vm.state not in (VmState.PENDING, VmState.RUNNING):
            return []  # terminated meanwhile: the epilog releases what is held
        failing = vm.state is VmState.PENDING or image_ids is None
        dropped = [d for d in vm.disks if failing or d.image_id in image_ids]
        steps: list[Step] = []
        for disk in dropped:
            if disk.state is DiskState.DETACHING:
                continue  # a detach releases it
            _drop_disk(conn, vm_id, disk.image_id)
            steps += _release(vm, disk, read(disk.image_id), failed=False, why=f"prolog failed: {reason}")
        if failing:
            _touch(conn, vm_id, state=VmState.FAILED.value, error=rules.error_message(reason))
        else:
            _touch(conn, vm_id, error=rules.error_message(reason))
        return steps

    _ready(catalog).commit_rows(plan, writer=writer)
    return find(catalog, vm_id)


def record_error(catalog: Catalog, vm_id: int, reason: str) -> None:
    """An epilog failed: the VM keeps what it still holds and says why (terminate or detach again)."""

    def plan(conn: sa.Connection, read: Reader) -> list[Step]:
        if _read(conn, vm_id, lock=True) is not None:
            _touch(conn, vm_id, error=rules.error_message(reason))
        return []

    _ready(catalog).commit_rows(plan)


# --- waiting on a LOCKED image ------------------------------------------------------------------

class ImageFailed(Refused):
    """An image a VM waited on went to ERROR instead of being unlocked."""


def waits_on(image: Image) -> bool:
    """Whether a VM holding this image must still wait for it (a file operation is writing it)."""
    return image.state in (ImageState.LOCKED_USED, ImageState.LOCKED_USED_PERS)


def check_usable_now(image: Image) -> None:
    """Refuse to make a disk of an image that went to ERROR while the VM waited for it."""
    if image.state is ImageState.ERROR:
        raise ImageFailed(f"Image {image.id} went to ERROR while the VM waited for it: {image.error or 'no reason'}")
