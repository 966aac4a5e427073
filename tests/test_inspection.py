"""What the format inspection takes and refuses, on real files: ISOs made by xorriso (plain and
hybrid, as distributions ship them), disks partitioned by sgdisk, qcow2s made by qemu-img and
patched to lie about their size, formats hidden in one another."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from catalog.model import DiskFormat, Refused
from tasks.inspection import Inspection, inspect_stream, precheck_file
from tests.conftest import (
    ISO_DESCRIPTOR, hide_qcow2_in, make_gpt_disk, make_iso, make_qcow2_claiming, patch_file, qemu_img,
)

MiB = 1024 * 1024
TiB = 1024**4


def inspect(path: Path, declared: DiskFormat | None = None) -> Inspection:
    """Both ways the service inspects bytes: the CLI's precheck of the file, then the whole stream."""
    precheck_file(path, declared)
    with open(path, "rb") as stream:
        return inspect_stream(stream, declared=declared, origin=f"File {path}", chunk_size=MiB)


def refusal(path: Path, declared: DiskFormat | None = None) -> tuple[str, str]:
    """The refusal of the precheck and of the stream inspection (both must refuse)."""
    with pytest.raises(Refused) as early:
        precheck_file(path, declared)
    with pytest.raises(Refused) as late, open(path, "rb") as stream:
        inspect_stream(stream, declared=declared, origin=f"File {path}", chunk_size=MiB)
    return str(early.value), str(late.value)


@pytest.mark.parametrize("hybrid, detected", [(None, "iso"), ("mbr", "iso+gpt"), ("gpt", "iso+gpt")])
@pytest.mark.parametrize("declared", [None, DiskFormat.RAW])
def test_isos_plain_and_hybrid_are_raw_of_their_byte_size(tmp_path, hybrid, detected, declared):
    iso = make_iso(tmp_path / "boot.iso", hybrid=hybrid)
    found = inspect(iso, declared)
    assert (found.format, found.detected) == (DiskFormat.RAW, detected)
    assert found.size == found.virtual_size == iso.stat().st_size


def test_hybrid_iso_declared_qcow2_is_a_mismatch(tmp_path):
    iso = make_iso(tmp_path / "boot.iso", hybrid="gpt")
    for message in refusal(iso, DiskFormat.QCOW2):
        assert "is raw (detected iso+gpt) but was declared qcow2: use --driver raw" in message


def test_an_iso_whose_volume_descriptor_lies_gets_its_byte_size(tmp_path):
    """The descriptor claims 0xFFFFFFFF blocks of 64 KiB (~256 TiB): never trusted for raw bytes."""
    iso = make_iso(tmp_path / "liar.iso")
    patch_file(iso, ISO_DESCRIPTOR + 80, struct.pack("<I", 0xFFFFFFFF) + struct.pack(">I", 0xFFFFFFFF))
    patch_file(iso, ISO_DESCRIPTOR + 128, struct.pack("<H", 0xFFFF) + struct.pack(">H", 0xFFFF))
    found = inspect(iso)
    assert found.detected == "iso"
    assert found.virtual_size == iso.stat().st_size < MiB


def test_a_partitioned_disk_is_raw(tmp_path):
    found = inspect(make_gpt_disk(tmp_path / "disk.raw"))
    assert (found.format, found.detected, found.virtual_size) == (DiskFormat.RAW, "gpt", 16 * MiB)


@pytest.fixture
def qcow2_header(tmp_path) -> Path:
    path = tmp_path / "real.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    return path


@pytest.mark.parametrize("case, formats", [
    ("qcow2 in an iso", "iso, qcow2"),
    ("qcow2 in a hybrid iso", "gpt, iso, qcow2"),
    ("qcow2 in a partitioned raw disk", "gpt, qcow2"),
])
def test_a_format_hidden_in_an_iso_or_a_raw_disk_is_refused(tmp_path, qcow2_header, case, formats):
    if case == "qcow2 in an iso":  # as oslo.utils' own test builds it: the ISO past its system area
        path = make_iso(tmp_path / "plain.iso")
        patch_file(path, 0, qcow2_header.read_bytes()[:ISO_DESCRIPTOR])
    elif case == "qcow2 in a hybrid iso":
        path = hide_qcow2_in(make_iso(tmp_path / "hybrid.iso", hybrid="mbr"), qcow2_header)
    else:
        path = hide_qcow2_in(make_gpt_disk(tmp_path / "disk.raw"), qcow2_header)
    for declared in (None, DiskFormat.RAW, DiskFormat.QCOW2):
        for message in refusal(path, declared):
            assert f"matches several formats at once ({formats}): one format is hidden in another" in message


def test_a_hybrid_iso_with_a_broken_partition_table_is_refused_as_unsafe(tmp_path):
    """The GPT/MBR half of a hybrid ISO is still safety-checked (an invalid boot flag here)."""
    iso = make_iso(tmp_path / "hybrid.iso", hybrid="mbr")
    patch_file(iso, 446, b"\x42")
    for message in refusal(iso):
        assert "was refused as unsafe (gpt)" in message and "invalid boot flag" in message


@pytest.mark.parametrize("claimed, message", [
    (2**60, "whose header claims a virtual size of 1048576T (1152921504606846976 bytes), above the largest "
            "this service takes (64T, HCX_MAX_VIRTUAL_SIZE)"),
    (2**64 - 1, "whose header claims a virtual size of 16777216T (18446744073709551615 bytes)"),
    (0, "is a qcow2 whose header gives no usable virtual size (0)"),
])
def test_a_qcow2_claiming_an_impossible_size_is_refused(tmp_path, claimed, message):
    path = make_qcow2_claiming(tmp_path / "liar.qcow2", claimed)
    for refused in refusal(path):
        assert message in refused
        assert "rebuild" in refused  # what to do


def test_the_largest_allowed_qcow2_size_is_taken_and_one_byte_more_is_not(tmp_path, monkeypatch):
    from catalog.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_virtual_size", TiB)
    assert inspect(make_qcow2_claiming(tmp_path / "edge.qcow2", TiB)).virtual_size == TiB
    for refused in refusal(make_qcow2_claiming(tmp_path / "over.qcow2", TiB + 512)):
        assert "above the largest this service takes (1T, HCX_MAX_VIRTUAL_SIZE)" in refused


def test_raw_bytes_above_the_limit_are_refused(tmp_path, monkeypatch):
    from catalog.settings import get_settings

    monkeypatch.setattr(get_settings(), "max_virtual_size", MiB)
    path = tmp_path / "big.raw"
    path.write_bytes(bytes(MiB + 1))
    for refused in refusal(path):
        assert "is 1M (1048577 bytes), above the largest virtual size this service takes (1M" in refused


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.raw"
    path.touch()
    for refused in refusal(path):
        assert "is empty (0 bytes): there is no disk in it" in refused
