"""The VM flows from their deployments, run by the platform's worker (`hcx-image up`): the prolog
links a persistent image and copies a non-persistent one into the platform's system datastore,
the epilog deletes the copy and releases both; each run reports its VM's event and disks' table."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

from blocks.datastore import ObjectRef
from catalog import vms
from catalog.model import DiskFormat, ImageState, ImageType
from tests.conftest import ALICE, register_image


def test_vm_prolog_and_epilog_run_from_their_deployments(platform):
    catalog, store = platform.catalog, platform.datastore("default")
    tag = uuid.uuid4().hex
    content = os.urandom(128 * 1024 + 3)
    ref = store.image_ref(tag)
    info = store.upload(io.BytesIO(content), ref)
    copied = register_image(catalog, f"vm-data-{tag[:8]}", upload_id=tag, type_=ImageType.DATABLOCK,
                            format_=DiskFormat.RAW, source=str(ref), source_etag=info.etag, size=len(content),
                            sha256=hashlib.sha256(content).hexdigest())
    linked = register_image(catalog, f"vm-os-{tag[:8]}", persistent=True, size=1024)  # a link reads no byte
    vm = vms.create(catalog, ALICE, f"vm-{tag[:8]}", [linked.id, copied.id])

    reply = platform.create_run("vm-prolog", {"request": {"vm_id": vm.id}})
    assert reply.status_code == 201, reply.text
    run = platform.wait_run(reply.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    running = vms.get(catalog, vm.id)
    copy = running.disk(copied.id)
    assert running.state is vms.VmState.RUNNING and running.disk(linked.id).object == linked.source
    system = platform.datastore("system")
    body, _ = system.open_read(ObjectRef.parse("system", copy.object))
    with body:
        assert hashlib.sha256(body.read()).hexdigest() == copied.sha256
    tables = {a["key"]: json.loads(a["data"]) for a in platform.artifacts(run["id"]) if a["type"] == "table"}
    assert sorted((r["image"], r["mode"], r["disk state"]) for r in tables["vm-prolog-disks"]) == [
        (copied.id, "copy", "READY"), (linked.id, "link", "READY")]
    assert platform.wait_for_events("hcx.vm.running", f"hcx.vm.{vm.id}")

    vms.begin_terminate(catalog, ALICE, vm.id)
    reply = platform.create_run("vm-epilog", {"request": {"vm_id": vm.id}})
    run = platform.wait_run(reply.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    assert vms.get(catalog, vm.id).state is vms.VmState.TERMINATED
    assert not system.exists(ObjectRef.parse("system", copy.object))
    assert [(catalog.get(i).state, catalog.get(i).running_vms) for i in (linked.id, copied.id)] == [
        (ImageState.READY, 0), (ImageState.READY, 0)]
    tables = {a["key"]: json.loads(a["data"]) for a in platform.artifacts(run["id"]) if a["type"] == "table"}
    assert sorted((r["id"], r["state"]) for r in tables["vm-epilog-images"]) == [
        (copied.id, "READY"), (linked.id, "READY")]
