"""qemu-img, the one tool that makes disk images: its failures become hcx-images errors here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from catalog.model import DiskFormat, ImageToolError

QEMU_IMG = "qemu-img"


def _run(*args: str) -> str:
    try:
        done = subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise ImageToolError("qemu-img is not installed: install the `qemu-utils` package.") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip() or f"exit status {exc.returncode}"
        raise ImageToolError(f"qemu-img {args[0]} failed: {detail}") from None
    except subprocess.TimeoutExpired:
        raise ImageToolError(f"qemu-img {args[0]} did not finish within 300 s.") from None
    return done.stdout


def create(path: Path, driver: DiskFormat, size: int) -> None:
    """`qemu-img create -f raw|qcow2 PATH SIZE` (a raw file is sparse: it takes no disk space)."""
    _run("create", "-q", "-f", driver.value, str(path), str(size))


def measure(driver: DiskFormat, size: int) -> int:
    """Bytes an empty image of this virtual size needs in the datastore (`qemu-img measure`):
    the full size for raw, the metadata for qcow2."""
    found = json.loads(_run("measure", "--output=json", "-O", driver.value, "--size", str(size)))
    return int(found["required"])
