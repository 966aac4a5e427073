"""Format inspection and hashing of image bytes, before anything trusts them.

oslo.utils' format inspector does the parsing (the same checks Glance runs): it recognises the
format from the content, and its safety checks refuse a qcow2 with a backing file, an external
data file or unknown features, VMDK extents pointing at paths, and one format hidden in another.

Sizes are checked here too: an empty image is refused, a raw image (ISO 9660 and partitioned disks
included) has the virtual size of its bytes (an ISO's volume descriptor is never trusted), and a
qcow2 header's virtual size must be a positive number no larger than Settings.max_virtual_size.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

from oslo_utils.imageutils import format_inspector

from catalog.model import ChecksumMismatch, DiskFormat, Refused, human_size
from catalog.settings import get_settings

if TYPE_CHECKING:  # the CLI prechecks files with this module: no pydantic models imported for it
    from catalog.requests import Checksum

# What the hypervisor sees: an ISO 9660 file and a partitioned disk (GPT/MBR) are raw to the driver.
_DRIVER_OF_DETECTED = {
    "raw": DiskFormat.RAW, "iso": DiskFormat.RAW, "gpt": DiskFormat.RAW, "iso+gpt": DiskFormat.RAW,
    "qcow2": DiskFormat.QCOW2,
}

# A hybrid ISO: an ISO 9660 image whose system area (its first 32 KiB, which the standard leaves
# to the system, for boot code) also holds an MBR or a GPT, so that the same bytes boot from a CD
# and from a USB stick, as Linux distributions ship them. oslo.utils matches both formats and
# documents this pair as the legitimate multiple match (`InspectWrapper.formats`: "bootable
# ISOs"); both are raw to the hypervisor, so nothing reads these bytes as another format, and both
# inspectors' safety checks still run. Any other multiple match (a qcow2 or vmdk header hidden in
# an ISO or in a partitioned disk) is refused.
HYBRID_ISO = frozenset({"iso", "gpt"})


@dataclass(frozen=True)
class Inspection:
    format: DiskFormat
    detected: str  # what the inspector named: raw, iso, gpt, iso+gpt (a hybrid ISO) or qcow2
    size: int
    virtual_size: int
    sha256: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = self.format.value
        return data


@dataclass(frozen=True)
class _Detected:
    """The format(s) oslo.utils found: one, or the iso+gpt pair of a hybrid ISO."""

    name: str
    inspectors: tuple

    @property
    def header_virtual_size(self):
        """What a disk-format header claims (qcow2); None for raw bytes, whose size is their own."""
        if _DRIVER_OF_DETECTED.get(self.name) is DiskFormat.RAW:
            return None
        return self.inspectors[0].virtual_size


def _detected(wrapper: format_inspector.InspectWrapper, origin: str) -> _Detected:
    """One format, or a hybrid ISO; several formats otherwise is one hidden in another: refused."""
    formats = wrapper.formats  # decided once the wrapper is closed; [raw] when nothing specific matched
    names = sorted(str(i) for i in formats)
    if len(formats) == 1:
        return _Detected(name=names[0], inspectors=tuple(formats))
    if set(names) == HYBRID_ISO:
        return _Detected(name="iso+gpt", inspectors=tuple(sorted(formats, key=str, reverse=True)))
    raise Refused(
        f"{origin} matches several formats at once ({', '.join(names)}): one format is hidden in "
        "another, which hcx-images never takes. Rebuild the image with its own tool (e.g. "
        "`qemu-img convert -O qcow2`) and upload that."
    )


def _driver_for(found: _Detected, declared: DiskFormat | None, origin: str) -> DiskFormat:
    driver = _DRIVER_OF_DETECTED.get(found.name)
    if driver is None:
        raise Refused(
            f"{origin} is in format {found.name!r}, which hcx-images does not take"
            f"{f' (declared {declared.value!r})' if declared else ''}: convert it with "
            f"`qemu-img convert -O qcow2` first."
        )
    for inspector in found.inspectors:
        try:
            inspector.safety_check()
        except format_inspector.SafetyCheckFailed as exc:
            reasons = "; ".join(f"{name}: {failure}" for name, failure in exc.failures.items())
            raise Refused(f"{origin} was refused as unsafe ({inspector}): {reasons}. Nothing was registered.") from None
        except format_inspector.ImageFormatError as exc:
            raise Refused(f"{origin} was refused as unsafe ({inspector}): {exc}. Nothing was registered.") from None
    if declared is not None and driver is not declared:
        if found.name == "raw":
            raise Refused(f"{origin} is raw (no disk format header found) but was declared {declared.value}: "
                          f"use --driver raw, or convert the image to {declared.value}.")
        raise Refused(
            f"{origin} is {driver.value} (detected {found.name}) but was declared {declared.value}: "
            f"use --driver {driver.value}, or convert the image to {declared.value}."
        )
    return driver


def _refuse_empty(size: int, origin: str) -> None:
    if size == 0:
        raise Refused(f"{origin} is empty (0 bytes): there is no disk in it. Check the file and upload it again.")


def _virtual_size(found: _Detected, size: int, origin: str) -> int:
    """Raw bytes (ISO and partitioned disks too) are as large as they are; a qcow2's header size
    must be a positive integer within Settings.max_virtual_size."""
    limit = get_settings().max_virtual_size
    claimed = found.header_virtual_size
    if claimed is None:
        if size > limit:
            raise Refused(
                f"{origin} is {human_size(size)} ({size} bytes), above the largest virtual size this "
                f"service takes ({human_size(limit)}, HCX_MAX_VIRTUAL_SIZE): an administrator may raise "
                "HCX_MAX_VIRTUAL_SIZE, or convert the image to qcow2 (`qemu-img convert -O qcow2`)."
            )
        return size
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed <= 0:
        raise Refused(
            f"{origin} is a {found.name} whose header gives no usable virtual size ({claimed!r}): the "
            "image is damaged or was not made by qemu-img; check it with `qemu-img check`, rebuild it "
            "and upload it again."
        )
    if claimed > limit:
        raise Refused(
            f"{origin} is a {found.name} whose header claims a virtual size of {human_size(claimed)} "
            f"({claimed} bytes), above the largest this service takes ({human_size(limit)}, "
            "HCX_MAX_VIRTUAL_SIZE): if the disk really is that large an administrator may raise "
            "HCX_MAX_VIRTUAL_SIZE; otherwise the header is damaged: rebuild the image "
            "(`qemu-img convert -O qcow2`) and upload it again."
        )
    return claimed


def precheck_file(path: Path, declared: DiskFormat | None) -> DiskFormat:
    """Read just enough of a local file to refuse an empty, wrong, unsafe or oversized image
    before uploading it."""
    origin = f"File {path}"
    size = path.stat().st_size
    _refuse_empty(size, origin)
    with open(path, "rb") as source:
        wrapper = format_inspector.InspectWrapper(source)
        try:
            while wrapper.formats is None and wrapper.read(64 * 1024):
                pass
        finally:
            wrapper.close()
    found = _detected(wrapper, origin)
    driver = _driver_for(found, declared, origin)
    _virtual_size(found, size, origin)
    return driver


class HashingReader:
    """A read-only file-like wrapper that hashes and counts the bytes read through it."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None] | None = None):
        self._stream = stream
        self._progress = progress
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.digest.update(chunk)
        self.size += len(chunk)
        if self._progress is not None and chunk:
            self._progress(len(chunk))
        return chunk

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


INSPECTOR_STEP = 1024 * 1024


class StreamInspector:
    """Inspection fed in order, chunk by chunk (`update`), from wherever the bytes are: detects the
    format, hashes (sha256, and a published `checksum` to check) and counts. `inspection()` once
    everything was fed. Bytes are looked at once, on their way, never read again."""

    def __init__(self, checksum: Checksum | None = None):
        self._handed = b""
        self._wrapper = format_inspector.InspectWrapper(self._Handed(self))
        self._sha256 = hashlib.sha256()
        self._checksum = checksum
        self._checked = hashlib.new(checksum.algorithm) if checksum and checksum.algorithm != "sha256" else None
        self.size = 0

    class _Handed:
        """The wrapper's source: the chunk `update` hands it (oslo.utils' wrapper only pulls)."""

        def __init__(self, inspector: "StreamInspector"):
            self._inspector = inspector

        def read(self, size: int = -1) -> bytes:
            chunk, self._inspector._handed = self._inspector._handed, b""
            return chunk

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        # The format inspectors see it a MiB at a time: their end-of-stream regions copy every chunk
        # they are shown twice, and a 16 MiB part's copies were fresh allocations each (page faults):
        # 51 -> 15 ms of CPU per 16 MiB part. Slices of a memoryview copy nothing.
        view = memoryview(chunk)
        for start in range(0, len(view), INSPECTOR_STEP):
            self._handed = view[start:start + INSPECTOR_STEP]
            self._wrapper.read(len(self._handed))
        self._sha256.update(chunk)
        if self._checked is not None:
            self._checked.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def check_checksum(self, origin: str) -> None:
        """Refuse bytes whose published checksum does not match (IntegrityError: nothing is kept)."""
        if self._checksum is None:
            return
        found = self.sha256 if self._checked is None else self._checked.hexdigest()
        if found != self._checksum.value:
            raise ChecksumMismatch(
                f"{origin} has {self._checksum.algorithm} {found}, but {self._checksum.value} was given: the bytes "
                "are not the ones published (damaged or replaced on the way, or the wrong checksum). Nothing was "
                "kept; check the checksum and the source, and try again.")

    def inspection(self, *, declared: DiskFormat | None, origin: str) -> Inspection:
        """Check the published checksum, detect and safety-check the format, check the sizes: what
        the bytes fed were."""
        self._wrapper.close()
        _refuse_empty(self.size, origin)
        self.check_checksum(origin)
        found = _detected(self._wrapper, origin)
        driver = _driver_for(found, declared, origin)
        virtual_size = _virtual_size(found, self.size, origin)
        return Inspection(format=driver, detected=found.name, size=self.size, virtual_size=virtual_size,
                          sha256=self.sha256)


class HoldBudget:
    """Bytes that parts waiting for their turn may hold, shared by every upload of a process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class Arrival:
    """One part's bytes on their way in, with the budget it reserved for being held (0: none)."""

    def __init__(self, number: int, reserved: int):
        self.number = number
        self.reserved = reserved


class PartsInOrder:
    """The parts of one upload, sent in parallel and in any order, inspected in order as they
    arrive: the next part at once, a later one held (within `budget`) until its turn. A part the
    budget cannot hold is not inspected here: `inspected_parts` then stops short, and whoever
    completes the upload reads the rest back from the store (`resume_from`). So does a process
    that never saw the first parts (it started after them). To keep that rare, a later part
    reserves its room before its bytes are read, and waits, unread, while there is none and the
    part next in order is on its way (`admit`)."""

    def __init__(self, part_size: int, budget: HoldBudget, checksum: Checksum | None = None):
        self.part_size = part_size
        self.inspector = StreamInspector(checksum)
        self.etags: list[str] = []  # of the parts inspected, in order
        self._budget = budget
        self._held: dict[int, tuple[bytes, str]] = {}
        self._arriving: collections.Counter[int] = collections.Counter()  # parts whose bytes are coming in
        self._lock = threading.Lock()
        self.last_fed = time.monotonic()

    def admit(self, number: int, size: int, *, next_may_be_on_its_way: bool) -> Arrival | None:
        """Part `number`, `size` bytes, may come in now (an `Arrival`, to use with `arriving`), or
        had better wait before its bytes are read (None): it would have to be held, the budget has
        no room for it, and the part next in order is on its way (once that one is inspected, this
        one may be next, or there may be room). Otherwise waiting gains nothing.
        `next_may_be_on_its_way`: a request sent at the same moment may not have said so yet."""
        with self._lock:
            following = self.inspected_parts + 1
            if number <= following:
                return Arrival(number, 0)
            if self._budget.take(size):
                return Arrival(number, size)
            if following in self._arriving or next_may_be_on_its_way:
                return None
            return Arrival(number, 0)

    @contextmanager
    def arriving(self, arrival: Arrival) -> Iterator[None]:
        """While the part's bytes are read, stored and fed; its reservation, if `feed` did not
        take it, goes back to the budget after."""
        with self._lock:
            self._arriving[arrival.number] += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving[arrival.number] -= 1
                if not self._arriving[arrival.number]:
                    del self._arriving[arrival.number]
                self._budget.give_back(arrival.reserved)
                arrival.reserved = 0

    @property
    def inspected_parts(self) -> int:
        return len(self.etags)

    def feed(self, arrival: Arrival, data: bytes | bytearray, etag: str) -> None:
        """The part `admit` let in (1-based `arrival.number`) was stored with `etag`."""
        number = arrival.number
        reserved, arrival.reserved = arrival.reserved, 0  # this call takes the reservation over
        with self._lock:
            self.last_fed = time.monotonic()
            if number > self.inspected_parts + 1:
                if number in self._held:  # sent again while held: the newer copy counts
                    self._budget.give_back(len(self._held.pop(number)[0]))
                if reserved or self._budget.take(len(data)):  # a reservation is the part's size
                    self._held[number] = (data, etag)
                return
            self._budget.give_back(reserved)
            if number <= self.inspected_parts:
                return  # sent again after a cut: completion compares the ETags it inspected
            self._inspect(data, etag)
            while (following := self._held.pop(self.inspected_parts + 1, None)) is not None:
                self._budget.give_back(len(following[0]))
                self._inspect(*following)

    def _inspect(self, data: bytes, etag: str) -> None:
        self.inspector.update(data)
        self.etags.append(etag)

    def release(self) -> None:
        """Give the held parts' bytes back to the budget (the upload completed or went away)."""
        with self._lock:
            for data, _ in self._held.values():
                self._budget.give_back(len(data))
            self._held.clear()

    def resume_from(self, stored_etags: list[str]) -> int | None:
        """The byte offset from which the completed object must be read to finish the inspection,
        given the ETags of the parts it was made of; None when what was inspected is not a prefix
        of it (a part was sent again with other bytes after it was inspected): start afresh."""
        if stored_etags[:self.inspected_parts] != self.etags:
            return None
        return self.inspected_parts * self.part_size


class InspectingReader:
    """A read-only file over `stream` that inspects (`StreamInspector`) what whoever reads it pulls
    through (s3transfer sending the bytes, say). `inspection()` once everything was read."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], None] | None = None,
                 checksum: Checksum | None = None):
        self._stream = stream
        self._progress = progress
        self.inspector = StreamInspector(checksum)

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.inspector.update(chunk)
        if self._progress is not None and chunk:
            self._progress(len(chunk))
        return chunk

    def inspection(self, *, declared: DiskFormat | None, origin: str) -> Inspection:
        return self.inspector.inspection(declared=declared, origin=origin)


def inspect_stream(
    stream: BinaryIO,
    *,
    declared: DiskFormat | None,
    origin: str,
    chunk_size: int,
    progress: Callable[[int], None] | None = None,
    checksum: Checksum | None = None,
) -> Inspection:
    """Read a whole stream once: detect and safety-check the format, count and hash the bytes,
    check the sizes (and a published checksum)."""
    reader = InspectingReader(stream, progress, checksum)
    while reader.read(chunk_size):
        pass
    return reader.inspection(declared=declared, origin=origin)
