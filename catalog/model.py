"""The image model: types, states, formats and the errors the domain raises."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, NamedTuple, TypedDict


class ImageType(str, enum.Enum):
    OS = "OS"
    CDROM = "CDROM"
    DATABLOCK = "DATABLOCK"


class ImageState(str, enum.Enum):
    INIT = "INIT"
    READY = "READY"
    USED = "USED"
    DISABLED = "DISABLED"
    LOCKED = "LOCKED"
    ERROR = "ERROR"
    CLONE = "CLONE"
    DELETE = "DELETE"
    USED_PERS = "USED_PERS"
    LOCKED_USED = "LOCKED_USED"
    LOCKED_USED_PERS = "LOCKED_USED_PERS"

    @property
    def short(self) -> str:
        """The list view's short name (as in the product docs' life-cycle table)."""
        return _SHORT_NAMES[self]


_SHORT_NAMES = {
    ImageState.INIT: "init",
    ImageState.READY: "rdy",
    ImageState.USED: "used",
    ImageState.DISABLED: "disa",
    ImageState.LOCKED: "lock",
    ImageState.ERROR: "err",
    ImageState.CLONE: "clon",
    ImageState.DELETE: "dele",
    ImageState.USED_PERS: "used",
    ImageState.LOCKED_USED: "lock",
    ImageState.LOCKED_USED_PERS: "lock",
}


class DiskFormat(str, enum.Enum):
    RAW = "raw"
    QCOW2 = "qcow2"


class Bus(str, enum.Enum):
    VIRTIO = "virtio"
    SCSI = "scsi"
    SATA = "sata"
    IDE = "ide"

    @property
    def dev_prefix(self) -> str:
        return {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}[self.value]


class Operation(str, enum.Enum):
    """The file operations a flow performs on an image; recorded so `retry` can re-run them."""

    UPLOAD = "upload"
    CLONE = "clone"
    CREATE_EMPTY = "create-empty"
    DELETE = "delete"


@dataclass(frozen=True)
class OperationRecord:
    """The file operation an image waits on or failed in, recorded so `retry` can run it again:
    the operation, the request it was started with (its JSON), the staged upload it reads, and for
    a forced delete the flow run it must stop first."""

    op: Operation
    request: dict[str, Any] | None = None
    upload_id: str | None = None
    stops_run: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op.value, "request": self.request, "upload_id": self.upload_id,
                "stops_run": self.stops_run}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "OperationRecord | None":
        if not data:
            return None
        return cls(op=Operation(data["op"]), request=data.get("request"), upload_id=data.get("upload_id"),
                   stops_run=data.get("stops_run"))


class SubjectKind(str, enum.Enum):
    """Who a quota is set for."""

    USER = "user"
    GROUP = "group"


class QuotaSubject(NamedTuple):
    kind: SubjectKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}"


@dataclass(frozen=True)
class Quota:
    """At most `max_images` images and `max_bytes` bytes (None: no limit) for a user's or a group's
    images on one datastore (`datastore` None: on all of them together)."""

    subject: QuotaSubject
    datastore: str | None = None
    max_images: int | None = None
    max_bytes: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_images is None and self.max_bytes is None

    @property
    def scope(self) -> str:
        return f"datastore {self.datastore}" if self.datastore else "all datastores"


@dataclass(frozen=True)
class QuotaUsage:
    images: int
    bytes: int


class HcxError(Exception):
    """Base of every error hcx-images reports to a user: the message says what and what to do."""


class Refused(HcxError):
    """The request breaks a rule; nothing was changed."""


class NotFound(Refused):
    pass


class PermissionDenied(Refused):
    pass


def missing_image(image_id: int) -> NotFound:
    """What a missing image answers, and one the caller may not see (the same words)."""
    return NotFound(f"Image {image_id} does not exist: `hcx-image list` shows the images you can see.")


class Superseded(HcxError):
    """A flow run wrote for an operation it no longer owns (a retry or a forced delete took the
    image over): nothing was changed."""


class ConcurrentChange(HcxError):
    """Another request changed the image first; the caller may re-read and try again."""


class StorageError(HcxError):
    """An object-store operation failed."""


class TransientStorageError(StorageError):
    """Worth retrying: timeouts, throttling, 5xx, dropped connections."""


class TransientSourceError(HcxError):
    """Fetching an image's source (a URL) failed in a way worth retrying: a timeout, a dropped
    connection, a 5xx or 429 answer."""


class IntegrityError(StorageError):
    """Bytes are not what they were said to be (size, hash, ETag or format); never retried."""


class ChecksumMismatch(IntegrityError):
    """Bytes whose published checksum (given by the user) is not theirs: the source is wrong."""


class ImageToolError(HcxError):
    """An image tool (qemu-img) failed or is missing."""


SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'10G', '512M', '1048576' -> bytes (binary units, like qemu-img)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not match or int(match.group(1)) <= 0:
        raise Refused(f"Invalid size {text!r}: use a positive number with K, M, G or T (e.g. 10G).")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024
    return str(n)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; the catalog writes UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Image:
    id: int
    name: str
    owner: str
    group: str
    type: ImageType
    persistent: bool
    bus: Bus
    format: DiskFormat
    datastore: str
    state: ImageState
    prev_state: ImageState | None = None
    permissions: int = 0o600
    description: str = ""
    attributes: dict = field(default_factory=dict)
    size: int | None = None
    virtual_size: int | None = None
    source: str | None = None
    source_etag: str | None = None
    sha256: str | None = None
    running_vms: int = 0
    cloning_ops: int = 0
    cloning_id: int | None = None
    snapshots: int = 0
    error: str | None = None
    last_operation: OperationRecord | None = None
    flow_run_id: str | None = None
    upload_id: str | None = None
    name_held: bool = True  # False while the row holds no name slot (DELETE; a failed delete)
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def dev_prefix(self) -> str:
        """CDROMs have no prefix of their own (the rules drop it); disks follow the bus."""
        return "" if self.type is ImageType.CDROM else self.bus.dev_prefix

    def with_changes(self, **changes) -> "Image":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The JSON shape of `show --json`: enums by value, state by its full name."""
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "group": self.group,
            "type": self.type.value,
            "state": self.state.value,
            "prev_state": self.prev_state.value if self.prev_state else None,
            "persistent": self.persistent,
            "bus": self.bus.value,
            "dev_prefix": self.dev_prefix,
            "format": self.format.value,
            "size": self.size,
            "virtual_size": self.virtual_size,
            "sha256": self.sha256,
            "datastore": self.datastore,
            "source": self.source,
            "permissions": f"{self.permissions:03o}",
            "description": self.description,
            "attributes": self.attributes,
            "running_vms": self.running_vms,
            "cloning_ops": self.cloning_ops,
            "cloning_id": self.cloning_id,
            "snapshots": self.snapshots,
            "error": self.error,
            "flow_run_id": self.flow_run_id,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


class Changes(TypedDict, total=False):
    """What a rule changes on an image: `state` always, any other field of `Image` as needed.
    The store applies it with one compare-and-set (`Image.with_changes` refuses unknown fields)."""

    state: ImageState
    name: str
    name_held: bool
    owner: str
    group: str
    permissions: int
    type: ImageType
    persistent: bool
    description: str
    attributes: dict
    size: int | None
    virtual_size: int | None
    source: str | None
    source_etag: str | None
    sha256: str | None
    running_vms: int
    cloning_ops: int
    cloning_id: int | None
    snapshots: int
    error: str | None
    last_operation: OperationRecord | None
    flow_run_id: str | None
