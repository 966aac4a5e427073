"""Empty images (`create --size`): raw zeros streamed to the datastore with bounded memory, qcow2
made by qemu-img and inspected again, refusals that change nothing."""

from __future__ import annotations

import hashlib
import re
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from blocks.datastore import ObjectRef, load_datastore
from catalog.model import DiskFormat, ImageState, ImageType
from catalog.requests import CreateEmptyRequest
from catalog.settings import get_settings
from flows.create_empty import create_empty
from tasks import transfer
from tests.conftest import catalog_snapshot

MiB = 1024 * 1024


def zeros_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in transfer.zeros(size, MiB):
        digest.update(chunk)
    return digest.hexdigest()


def test_cli_creates_an_empty_raw_datablock(cli, catalog):
    result = cli("create", "--name", "scratch-raw", "--type", "DATABLOCK", "--size", "20M", "--wait")
    assert result.exit_code == 0, result.stderr
    image = catalog.get(int(re.search(r"ID: (\d+)", result.stdout).group(1)))
    assert (image.state, image.type, image.format) == (ImageState.READY, ImageType.DATABLOCK, DiskFormat.RAW)
    assert image.size == image.virtual_size == 20 * MiB  # full size in S3
    assert image.sha256 == zeros_sha256(20 * MiB)
    store = load_datastore("default")
    assert store.head(ObjectRef.parse("default", image.source)).size == 20 * MiB
    assert [h["to_state"] for h in catalog.history(image.id)] == ["LOCKED", "LOCKED", "READY"]


def test_empty_qcow2_is_made_by_qemu_img_and_inspected(catalog, unique_name):
    before = set(Path(tempfile.gettempdir()).glob("hcx-empty-*"))
    image_id = create_empty(CreateEmptyRequest(owner="alice", name=unique_name(), type=ImageType.OS, size="1G",
                                               driver=DiskFormat.QCOW2, persistent=True))
    image = catalog.get(image_id)
    assert (image.state, image.type, image.format, image.persistent) == (ImageState.READY, ImageType.OS,
                                                                         DiskFormat.QCOW2, True)
    assert image.virtual_size == 1024 * MiB and image.size < MiB
    store = load_datastore("default")
    stored = transfer.inspect_object(store, ObjectRef.parse("default", image.source), DiskFormat.QCOW2)
    assert (stored.inspection.virtual_size, stored.inspection.sha256) == (1024 * MiB, image.sha256)
    assert set(Path(tempfile.gettempdir()).glob("hcx-empty-*")) == before  # the temp file is gone


def test_raw_image_is_streamed_without_holding_a_part(catalog, unique_name, monkeypatch):
    """192 MiB of zeros in 64 MiB parts: the parts are read from /dev/zero as they are sent, so the
    flow never holds even one part (a stream upload buffers whole parts: what made `--size 100T`,
    with its ~11 GiB parts, kill the process). Bound: half a part, whatever the image size."""
    settings = get_settings()
    for name, value in (("part_size", 64 * MiB), ("max_concurrency", 2), ("queued_parts", 2)):
        monkeypatch.setattr(settings, name, value)
    tracemalloc.start()
    try:
        image_id = create_empty(CreateEmptyRequest(owner="alice", name=unique_name(), size=192 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    image = catalog.get(image_id)
    assert (image.state, image.size, image.sha256) == (ImageState.READY, 192 * MiB, zeros_sha256(192 * MiB))
    assert peak < settings.part_size // 2, f"peak {peak / MiB:.0f} MiB"


@pytest.mark.parametrize("args, code, message", [
    (["--type", "CDROM", "--size", "1M"], 1, "A CDROM image cannot be created empty"),
    (["--size", "10X"], 1, "Invalid size '10X'"),
    (["--size", "0"], 1, "Invalid size '0'"),
    (["--size", "1M", "--skip-capacity-check"], 1, "Only an administrator may skip the datastore capacity check"),
    (["--size", "1M", "--driver", "qcow2", "--persistent", "--type", "CDROM"], 1, "cannot be created empty"),
    (["--size", "1M", "--path", "/etc/hostname"], 2, "give one of --path FILE"),
    (["--size", "100T"], 1, "Size 100T (109951162777600 bytes) is above the largest virtual size this service "
                            "takes (64T, HCX_MAX_VIRTUAL_SIZE): ask for a smaller disk"),
    (["--size", "100T", "--driver", "qcow2"], 1, "is above the largest virtual size this service takes (64T"),
    (["--size", "50T"], 1, "A raw image of 50T (54975581388800 bytes) is stored at full size, as one object, and "
                           "a datastore object holds at most 43.9T (S3 takes 9000 parts of 5 GiB here): use "
                           "--driver qcow2"),
    ([], 2, "give one of --path FILE"),
])
def test_create_empty_refusals_change_nothing(cli, catalog, unique_name, store_objects, args, code, message):
    store = load_datastore("default")
    before = (catalog.list(), store_objects(store))
    result = cli("create", "--name", unique_name(), *args)
    assert result.exit_code == code
    assert message in result.stderr + result.stdout
    assert (catalog.list(), store_objects(store)) == before


@pytest.mark.parametrize("size, driver, message", [
    ("100T", "raw", "Size 100T (109951162777600 bytes) is above the largest virtual size"),
    (str(2**64 - 1), "qcow2", "is above the largest virtual size this service takes (64T"),
    ("50T", "raw", "a datastore object holds at most 43.9T"),
])
def test_flow_refuses_an_impossible_size_from_any_caller(catalog, unique_name, store_objects, size, driver,
                                                         message):
    """The parameters as a deployment's REST API passes them (JSON): refused before anything is
    registered or written, with the same message as the CLI."""
    store = load_datastore("default")
    before = (catalog_snapshot(catalog), store_objects(store))
    state = create_empty({"owner": "alice", "name": unique_name(), "size": size, "driver": driver},
                         return_state=True)
    assert state.is_failed()
    assert message in state.message
    assert (catalog_snapshot(catalog), store_objects(store)) == before


def test_create_refuses_what_does_not_fit_the_datastore(cli, add_datastore, catalog, stack_state, unique_name, raw_file,
                                                        ready_image, store_objects):
    """`datastore add --limit`; an upload and an empty image that do not fit are refused up front."""
    ds = unique_name("small")
    added = add_datastore(ds, "--bucket", f"{ds}-b", "--limit", "5M")
    assert added.exit_code == 0, added.stderr
    store = load_datastore(ds)
    assert store.limit_bytes == 5 * MiB
    ready_image(datastore=ds, size=3 * MiB)  # fits; 2 MiB left
    before = (catalog.list(), store_objects(store))
    for args in (["--path", raw_file], ["--size", "3M"]):
        result = cli("create", "--name", unique_name(), "--datastore", ds, *args)
        assert result.exit_code == 1
        assert f"Datastore {ds} has no room for this image" in result.stderr
        assert (catalog.list(), store_objects(store)) == before
    small = create_empty(CreateEmptyRequest(owner="alice", name=unique_name(), datastore=ds, size="1G",
                                            driver=DiskFormat.QCOW2))
    assert catalog.get(small).state is ImageState.READY  # a qcow2 needs only its metadata
