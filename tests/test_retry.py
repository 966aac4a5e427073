"""`retry` of a failed upload (a failed clone and a failed delete are in test_clone and
test_delete): the staged bytes are reused only when they hash to what was registered, bytes proven
wrong are dropped, and the CLI stages its recorded local file again when the staged bytes are gone
and the file is unchanged, refusing otherwise with nothing changed."""

from __future__ import annotations

import io
import os
import re

from blocks.datastore import ObjectRef, load_datastore
from catalog.model import ImageState, Operation
from catalog.requests import RetryRequest
from flows.retry import retry
from flows.upload import upload
from tests.conftest import DENY_SERVER_COPIES


def test_failed_upload_recovers_with_retry(catalog, make_request, unique_name, new_datastore, cuttable_proxy,
                                           staging_leftovers):
    """Staged by an external tool into a separate staging bucket; the copy into the image bucket
    is refused (403): ERROR, the staged bytes kept as the image's source. Damaged, they are not
    trusted (and dropped); staged again and with copies allowed, the retry ends READY."""
    ds = new_datastore(cuttable_proxy.endpoint, staging_bucket=True)
    store = load_datastore(ds)
    data = os.urandom(3 * 1024 * 1024 + 11)
    upload_id = unique_name("ext")
    staged = store.staging_ref(upload_id)
    store.upload(io.BytesIO(data), staged)
    cuttable_proxy.deny(DENY_SERVER_COPIES)

    state = upload(make_request(unique_name(), datastore=ds, upload_id=upload_id), return_state=True)

    assert state.is_failed()
    image = catalog.find_by_upload_id(upload_id)
    assert image.state is ImageState.ERROR and " : Error copying image in the datastore: " in image.error
    assert "AccessDenied" in image.error and image.last_operation.op is Operation.UPLOAD
    assert store.exists(staged) and image.source == str(staged)  # kept for the retry, claimed by the image
    assert staging_leftovers(store) == []

    store.upload(io.BytesIO(os.urandom(len(data))), staged)  # same size, other bytes
    assert retry(RetryRequest(owner="alice", image_id=image.id), return_state=True).is_failed()
    damaged = catalog.get(image.id)
    assert damaged.state is ImageState.ERROR and "are not those image" in damaged.error
    assert not store.exists(staged)  # bytes proven wrong are not kept

    store.upload(io.BytesIO(data), staged)
    cuttable_proxy.deny(None)
    assert retry(RetryRequest(owner="alice", image_id=image.id)) == image.id
    done = catalog.get(image.id)
    assert (done.state, done.error, done.last_operation) == (ImageState.READY, None, None)
    assert done.source == str(store.image_ref(upload_id))
    assert store.open_read(ObjectRef.parse(ds, done.source))[0].read() == data
    assert store.list_keys(f"{ds}-staging", "") == [] and staging_leftovers(store) == []


def test_cli_retry_stages_the_recorded_file_again_only_if_unchanged(cli, catalog, tmp_path, unique_name,
                                                                    new_datastore, cuttable_proxy, make_request):
    ds = new_datastore(cuttable_proxy.endpoint, staging_bucket=True)
    store = load_datastore(ds)
    cuttable_proxy.deny(DENY_SERVER_COPIES)
    kept, changed = tmp_path / "kept.raw", tmp_path / "changed.raw"
    for path in (kept, changed):
        path.write_bytes(os.urandom(2 * 1024 * 1024 + 1))
    result = cli("create", "--name", unique_name(), "--datastore", ds, "--path", kept, "--wait")
    assert result.exit_code == 1 and "is in ERROR" in result.stderr
    failed = catalog.get(int(re.search(r"ID: (\d+)", result.stdout).group(1)))
    assert failed.last_operation.request["client_path"] == str(kept.resolve())
    # The other one as the CLI would have sent it, failed the same way (in-process: quicker).
    upload_id = unique_name("cli")
    store.upload(io.BytesIO(changed.read_bytes()), store.staging_ref(upload_id))
    upload(make_request(unique_name(), datastore=ds, upload_id=upload_id, client_path=str(changed)),
           return_state=True)
    other = catalog.find_by_upload_id(upload_id)
    assert other.state is ImageState.ERROR
    for image in (failed, other):
        store.delete(store.staging_ref(image.upload_id))  # swept while nobody retried
    cuttable_proxy.deny(None)

    changed.write_bytes(os.urandom(2 * 1024 * 1024 + 1))  # changed since
    before = (catalog.get(other.id), catalog.history(other.id), store.list_keys(f"{ds}-staging", ""))
    refused = cli("retry", other.id)
    assert refused.exit_code == 1
    assert f"{changed} has changed since" in refused.stderr and "delete the image and upload" in refused.stderr
    assert (catalog.get(other.id), catalog.history(other.id), store.list_keys(f"{ds}-staging", "")) == before

    result = cli("retry", failed.id, "--wait")
    assert result.exit_code == 0, result.stderr
    assert "retrying its upload, is LOCKED" in result.stdout
    done = catalog.get(failed.id)
    assert done.state is ImageState.READY
    assert store.open_read(ObjectRef.parse(ds, done.source))[0].read() == kept.read_bytes()
    assert store.list_keys(f"{ds}-staging", "") == []
