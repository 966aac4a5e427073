"""Image snapshots against the real SeaweedFS, Prefect harness and catalogs: each operation through
its flow (objects listed in the bucket, rows, counters, history), each refusal leaving nothing
changed, a failed copy leaving no row and no object, the seed's flatten-then-clone story, quotas and
capacity counting snapshot bytes (raced on PostgreSQL), and the verbs through the CLI and the API."""

from __future__ import annotations

import functools
import hashlib
import json

import pytest

from blocks.datastore import ObjectRef, load_datastore
from catalog import operations, snapshots
from catalog.model import ImageState, ImageType, NotFound, PermissionDenied, QuotaSubject, Refused, SubjectKind
from catalog.permissions import Actor
from catalog.quotas import set_quota
from catalog.identity import Directory
from catalog.requests import CloneRequest, DeleteRequest
from catalog.snapshots import Change, SnapshotRequest, SnapshotState, snapshots_of
from catalog.store import Catalog
from flows.clone import clone
from flows.delete import delete
from flows.snapshot import snapshot_create, snapshot_delete, snapshot_flatten, snapshot_revert
from tasks import transfer
from tests.conftest import ALICE, BOB, all_at_once, register_image

S = ImageState


def request(image_id: int, snapshot: str | int, actor: Actor = ALICE) -> SnapshotRequest:
    return SnapshotRequest(owner=actor.user, image_id=image_id, snapshot=str(snapshot))


def snapshot_keys(image) -> list[str]:
    """The objects in the image's snapshot area, listed from the bucket."""
    store = load_datastore(image.datastore)
    bucket, prefix = store.snapshot_area(image.id)
    return sorted(o["Key"] for o in store.list_keys(bucket, prefix))


def holds(image_or_snapshot, datastore: str, uri: str) -> bool:
    """The object re-hashes to the recorded sha256 (read back from the store)."""
    store = load_datastore(datastore)
    return transfer.matches(store, ObjectRef.parse(datastore, uri), size=image_or_snapshot.size,
                            sha256=image_or_snapshot.sha256)


def overwrite_object(image, data: bytes) -> None:
    """Other bytes at the image's object, behind the catalog's back (its recorded ETag goes stale)."""
    store = load_datastore(image.datastore)
    ref = ObjectRef.parse(image.datastore, image.source)
    store.client().put_object(Bucket=ref.bucket, Key=ref.key, Body=data)


def written_by_a_vm(catalog: Catalog, image, data: bytes):
    """New bytes in the image's object, recorded as its content: what a VM using a persistent image
    leaves behind (VMs are not part of this module)."""
    overwrite_object(image, data)
    etag = load_datastore(image.datastore).head(ObjectRef.parse(image.datastore, image.source)).etag
    return catalog.transition(image.id, lambda i: {"state": i.state, "sha256": hashlib.sha256(data).hexdigest(),
                                                   "size": len(data), "source_etag": etag},
                              message="written by a VM (test)")


def everything(catalog: Catalog, image) -> tuple:
    """What a refusal must leave as it was: the image row, its history, its snapshot rows, its
    snapshot objects, and the datastore's bytes in use."""
    return (catalog.get(image.id), catalog.history(image.id), snapshots_of(catalog, image.id), snapshot_keys(image),
            catalog.used_bytes(image.datastore))


def test_snapshot_story_revert_delete_flatten_then_clone(catalog, ready_image, unique_name):
    """The seed's story on a persistent image: with snapshots it can be neither cloned nor made
    non-persistent; revert gives it a snapshot's sha256; delete and flatten leave no object; after
    flatten it clones."""
    image = ready_image(persistent=True, size=256 * 1024 + 7)
    original = image.sha256

    assert snapshot_create(request(image.id, "first")) == 0
    first = snapshots_of(catalog, image.id)[0]
    after = catalog.get(image.id)
    assert (after.state, after.snapshots, after.error, after.sha256) == (S.READY, 1, None, original)
    assert (first.state, first.sha256, first.size, first.parent, first.active) == (
        SnapshotState.READY, original, image.size, None, True)
    assert holds(first, image.datastore, first.object) and first.object != image.source
    assert [h["to_state"] for h in catalog.history(image.id)][-2:] == ["LOCKED", "READY"]

    changed = written_by_a_vm(catalog, after, b"changed by a VM " * 4096)
    assert snapshot_create(request(image.id, "second")) == 1
    second = snapshots_of(catalog, image.id)[1]
    assert (second.sha256, second.size, second.parent) == (changed.sha256, 65536, 0)
    assert holds(second, image.datastore, second.object)
    assert catalog.get(image.id).snapshots == 2

    clone_request = CloneRequest(owner="alice", source_id=image.id, name=unique_name("copy"))
    with pytest.raises(Refused, match="persistent and has snapshots; flatten it first"):
        operations.check_clone(catalog, ALICE, clone_request, limit_bytes=None)
    with pytest.raises(Refused, match="it has snapshots; flatten it first"):
        operations.set_persistent(catalog, ALICE, image.id, False)

    assert snapshot_revert(request(image.id, "first")) == 0  # by name
    reverted = catalog.get(image.id)
    assert (reverted.state, reverted.sha256, reverted.size, reverted.snapshots) == (S.READY, original, image.size, 2)
    assert reverted.source == changed.source and holds(reverted, image.datastore, reverted.source)
    assert [s.active for s in snapshots_of(catalog, image.id)] == [True, False]

    assert snapshot_delete(request(image.id, 1)) == 1  # by number
    assert [s.number for s in snapshots_of(catalog, image.id)] == [0]
    assert snapshot_keys(image) == [ObjectRef.parse(image.datastore, first.object).key]
    assert catalog.get(image.id).snapshots == 1

    snapshot_flatten(request(image.id, "first"))
    flat = catalog.get(image.id)
    assert (flat.state, flat.snapshots, flat.sha256, flat.persistent) == (S.READY, 0, original, True)
    assert snapshots_of(catalog, image.id) == [] and snapshot_keys(image) == []
    assert holds(flat, image.datastore, flat.source)

    copy = catalog.get(clone(clone_request))
    assert (copy.state, copy.sha256) == (S.READY, original)
    assert catalog.get(image.id).state is S.READY
    operations.set_persistent(catalog, ALICE, image.id, False)  # and the toggle works again


def test_flatten_to_an_older_snapshot_and_delete_image_with_snapshots(catalog, ready_image):
    """Flatten to a snapshot that is not the image's content: the image takes its bytes, every
    snapshot goes. Deleting an image removes its snapshot objects with its own."""
    image = ready_image(size=128 * 1024)
    snapshot_create(request(image.id, "base"))
    written_by_a_vm(catalog, image, b"x" * 1000)
    snapshot_create(request(image.id, "later"))
    base = snapshots_of(catalog, image.id)[0]
    snapshot_flatten(request(image.id, "base"))
    flat = catalog.get(image.id)
    assert (flat.sha256, flat.size, flat.snapshots) == (base.sha256, base.size, 0)
    assert holds(flat, image.datastore, flat.source) and snapshot_keys(image) == []

    snapshot_create(request(image.id, "one"))
    snapshot_create(request(image.id, "two"))
    assert len(snapshot_keys(image)) == 2
    assert [s.number for s in snapshots_of(catalog, image.id)] == [2, 3]  # numbers are never given again
    delete(DeleteRequest(owner="alice", image_id=image.id))
    assert catalog.find(image.id) is None
    assert snapshot_keys(image) == [] and snapshots_of(catalog, image.id) == []
