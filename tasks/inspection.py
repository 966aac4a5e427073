"""Format inspection and hashing of image bytes, before anything trusts them.

oslo.utils' format inspector does the parsing (the same checks Glance runs): it recognises the
format from the content, and its safety checks refuse a qcow2 with a backing file, an external
data file or unknown features, VMDK extents pointing at paths, and one format hidden in another.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from oslo_utils.imageutils import format_inspector

from catalog.model import DiskFormat, Refused

# What the hypervisor sees: an ISO 9660 file and a partitioned disk (GPT/MBR) are raw to the driver.
_DRIVER_OF_DETECTED = {"raw": DiskFormat.RAW, "iso": DiskFormat.RAW, "gpt": DiskFormat.RAW, "qcow2": DiskFormat.QCOW2}


@dataclass(frozen=True)
class Inspection:
    format: DiskFormat
    detected: str  # what the inspector named: raw, iso, gpt or qcow2
    size: int
    virtual_size: int
    sha256: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["format"] = self.format.value
        return data


def _driver_for(inspector, declared: DiskFormat | None, origin: str) -> DiskFormat:
    detected = str(inspector)
    driver = _DRIVER_OF_DETECTED.get(detected)
    if driver is None:
        raise Refused(
            f"{origin} is in format {detected!r}, which hcx-images does not take"
            f"{f' (declared {declared.value!r})' if declared else ''}: convert it with "
            f"`qemu-img convert -O qcow2` first."
        )
    try:
        inspector.safety_check()
    except (format_inspector.SafetyCheckFailed, format_inspector.ImageFormatError) as exc:
        raise Refused(f"{origin} was refused as unsafe ({detected}): {exc}. Nothing was registered.") from None
    if declared is not None and driver is not declared:
        raise Refused(
            f"{origin} is {driver.value} (detected {detected}) but was declared {declared.value}: "
            f"use --driver {driver.value}, or convert the image to {declared.value}."
        )
    return driver


def _detect(wrapper, origin: str):
    try:
        return wrapper.format
    except format_inspector.ImageFormatError as exc:
        raise Refused(f"{origin} has an unknown or ambiguous format: {exc}.") from None


def precheck_file(path: Path, declared: DiskFormat | None) -> DiskFormat:
    """Read just enough of a local file to refuse a wrong or unsafe format before uploading."""
    origin = f"File {path}"
    try:
        inspector = format_inspector.detect_file_format(str(path))
    except format_inspector.ImageFormatError as exc:
        raise Refused(f"{origin} has an unknown or ambiguous format: {exc}.") from None
    if str(inspector) == "raw":  # raw is "nothing else matched": no header safety to check
        if declared not in (None, DiskFormat.RAW):
            raise Refused(f"{origin} is raw (no disk format header found) but was declared {declared.value}: "
                          f"use --driver raw, or convert the image to {declared.value}.")
        return DiskFormat.RAW
    return _driver_for(inspector, declared, origin)


def inspect_stream(
    stream: BinaryIO,
    *,
    declared: DiskFormat | None,
    origin: str,
    chunk_size: int,
    on_chunk: Callable[[bytes], None] | None = None,
) -> Inspection:
    """Read a whole stream once: detect and safety-check the format, count and hash the bytes."""
    wrapper = format_inspector.InspectWrapper(stream)
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := wrapper.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    finally:
        wrapper.close()
    inspector = _detect(wrapper, origin)
    driver = _driver_for(inspector, declared, origin)
    virtual_size = inspector.virtual_size or size
    return Inspection(format=driver, detected=str(inspector), size=size, virtual_size=virtual_size,
                      sha256=digest.hexdigest())
