"""The three ways bytes reach a datastore (adopt, server-side copy, streamed copy), each pinned to
the inspected bytes, against the real SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from blocks.datastore import S3Datastore
from catalog.model import DiskFormat, IntegrityError, Refused
from catalog.settings import S3_MAX_OBJECT
from tasks import transfer


@pytest.fixture
def stores(stack_state, unique_name):
    """Two views of the same SeaweedFS: `near` and `far` differ in endpoint spelling, which is
    enough for hcx to treat them as different endpoints (so copies between them stream)."""
    common = dict(access_key=stack_state.s3_access_key, secret_key=stack_state.s3_secret_key)
    near = S3Datastore(endpoint_url=stack_state.s3_endpoint, bucket=unique_name("near"), **common)
    far = S3Datastore(endpoint_url=stack_state.s3_endpoint.replace("127.0.0.1", "localhost"),
                      bucket=unique_name("far"), **common)
    near.ensure_buckets()
    far.ensure_buckets()
    return near, far


@pytest.fixture
def inspected(stores):
    near, _ = stores
    data = os.urandom(5 * 1024 * 1024 + 7)
    ref = near.ref("src/object")
    near.upload(io.BytesIO(data), ref)
    return data, transfer.inspect_object(near, ref, DiskFormat.RAW)


@pytest.mark.parametrize("route", ["adopt", "server", "stream"])
def test_copy_routes_move_exactly_the_inspected_bytes(stores, inspected, route):
    near, far = stores
    data, found = inspected
    dst_store = far if route == "stream" else near
    dst = found.ref if route == "adopt" else dst_store.ref("images/copy")
    moved = []
    info = transfer.copy_object(src_store=near, src=found.ref, dst_store=dst_store, dst=dst, etag=found.etag,
                                size=found.inspection.size, sha256=found.inspection.sha256, progress=moved.append)
    assert info.size == len(data)
    assert sum(moved) == len(data)
    body, _ = dst_store.open_read(dst)
    assert hashlib.sha256(body.read()).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("route", ["adopt", "server", "stream"])
def test_copy_refuses_bytes_changed_since_inspection(stores, inspected, route):
    near, far = stores
    _, found = inspected
    near.upload(io.BytesIO(b"replaced after inspection" * 1000), found.ref)  # same key, new ETag
    dst_store = far if route == "stream" else near
    dst = found.ref if route == "adopt" else dst_store.ref("images/copy")
    with pytest.raises(IntegrityError, match="changed since it was inspected"):
        transfer.copy_object(src_store=near, src=found.ref, dst_store=dst_store, dst=dst, etag=found.etag,
                             size=found.inspection.size, sha256=found.inspection.sha256)
    if route != "adopt":
        assert not dst_store.exists(dst)


def test_streamed_copy_with_wrong_hash_leaves_nothing(stores, inspected):
    near, far = stores
    _, found = inspected
    dst = far.ref("images/copy")
    with pytest.raises(IntegrityError, match="differs from the inspected"):
        transfer.copy_object(src_store=near, src=found.ref, dst_store=far, dst=dst, etag=found.etag,
                             size=found.inspection.size, sha256="0" * 64)
    assert not far.exists(dst)


def test_export_refuses_damaged_bytes_and_leaves_no_file(stores, inspected, tmp_path):
    near, _ = stores
    _, found = inspected
    dest = tmp_path / "out.raw"
    with pytest.raises(IntegrityError, match="damaged"):
        transfer.export_object(near, found.ref, dest, sha256="f" * 64)
    assert list(tmp_path.iterdir()) == []


def test_huge_objects_get_parts_under_the_s3_limit():
    config = S3Datastore.transfer_config(size_hint=200 * 1024**3)
    assert 200 * 1024**3 / config.multipart_chunksize <= 10_000
    assert S3Datastore.transfer_config().multipart_chunksize == 8 * 1024 * 1024


def test_upload_path_reads_a_device_for_the_size_given(stores):
    """/dev/zero has no size of its own: the size given is what is uploaded, in parts, with progress."""
    near, _ = stores
    ref = near.ref("images/zeros")
    size = 2 * S3Datastore.transfer_config().multipart_chunksize + 12_345
    moved = []
    info = near.upload_path(transfer.ZERO_DEVICE, ref, size=size, progress=moved.append)
    assert info.size == size == sum(moved)
    assert info.etag.strip('"').endswith("-3")  # a multipart upload of three parts
    body, _ = near.open_read(ref)
    assert hashlib.sha256(body.read()).hexdigest() == transfer.sha256_of_zeros(size, 1024 * 1024)


def test_an_object_larger_than_a_datastore_holds_is_refused_before_anything_is_written(stores):
    near, _ = stores
    ref = near.ref("images/too-big")
    with pytest.raises(Refused, match=r"more than a datastore holds \(43.9T: S3 takes at most 9000 parts of 5 GiB"):
        transfer.upload_zeros(near, ref, size=S3_MAX_OBJECT + 1)
    assert not near.exists(ref)
    assert near.list_multipart_uploads(near.bucket, "") == []


def test_the_largest_object_gets_parts_s3_takes():
    config = S3Datastore.transfer_config(size_hint=S3_MAX_OBJECT)
    assert config.multipart_chunksize <= 5 * 1024**3
    assert S3_MAX_OBJECT / config.multipart_chunksize <= 10_000
