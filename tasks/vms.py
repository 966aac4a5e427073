"""Prefect tasks of the VM prolog and epilog: each small and idempotent; the catalog writes are
`catalog.vms`'s, the copies `tasks.objects`'."""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from blocks.datastore import ObjectRef, load_datastore
from catalog import vms
from catalog.model import NotFound
from catalog.settings import get_settings
from catalog.store import open_catalog
from tasks.images import current_flow_run_id
from tasks.objects import remove_objects
from tasks.retry import IO_TASK

# How often a VM waiting on a LOCKED image looks at it again (a catalog read).
WAIT_POLL_SECONDS = 1.0


@task(**IO_TASK)
def wait_for_image(vm_id: int, image_id: int) -> bool:
    """Wait while a file operation writes the disk's image (LOCKED_USED*): True once it is
    unlocked, False if the VM stopped wanting the disk meanwhile (terminated); an image that went
    to ERROR fails the task (`ImageFailed`, not retried), and with it the VM."""
    catalog = open_catalog()
    marked = False
    while True:
        vm = vms.find(catalog, vm_id)
        if vm is None or vms.wanted_disk(vm, image_id) is None:
            return False
        image = catalog.get(image_id)
        vms.check_usable_now(image)
        if not vms.waits_on(image):
            return True
        if not marked:
            get_run_logger().info("VM %s waits for image %s (%s) to be unlocked", vm.name, image_id, image.state.value)
            marked = vms.mark_waiting(catalog, vm_id, image_id)
        time.sleep(WAIT_POLL_SECONDS)


@task(**IO_TASK)
def link_disk(vm_id: int, image_id: int) -> bool:
    """A persistent image's disk is a link to its own object: recorded, no byte copied."""
    image = open_catalog().get(image_id)
    return vms.disk_ready(open_catalog(), vm_id, image_id, datastore=image.datastore, object=image.source)


@task(**IO_TASK)
def copy_target(vm_id: int, image_id: int) -> ObjectRef | None:
    """Where the VM's copy of a non-persistent image goes in the system datastore, recorded before
    its first byte (None: the VM no longer wants the disk)."""
    name = get_settings().system_datastore
    try:
        system = load_datastore(name)
    except NotFound:
        raise NotFound(f"The system datastore {name!r} does not exist: non-persistent disks are copied into it. "
                       f"An administrator adds it (`hcx-image datastore add {name} --kind system ...`; "
                       "`hcx-image up` makes it on the embedded S3).") from None
    dst = system.vm_disk_ref(vm_id, image_id)
    if not vms.record_copy_target(open_catalog(), vm_id, image_id, datastore=name, object_uri=str(dst)):
        return None
    return dst


@task(**IO_TASK)
def copy_made(vm_id: int, image_id: int, dst: ObjectRef) -> bool:
    """The verified copy is the disk; a VM terminated meanwhile gets no disk: the copy goes."""
    if vms.disk_ready(open_catalog(), vm_id, image_id):
        return True
    _remove(dst)
    return False


@task(**IO_TASK)
def start_vm(vm_id: int) -> vms.Vm:
    return vms.start(open_catalog(), vm_id)


def _remove(ref: ObjectRef) -> None:
    remove_objects(load_datastore(ref.datastore), [ref])


@task(**IO_TASK)
def remove_copy(datastore: str, object_uri: str) -> None:
    """Delete a VM's copy of an image and prove it gone (idempotent: gone already is fine)."""
    _remove(ObjectRef.parse(datastore, object_uri))


@task(**IO_TASK)
def release_disk(vm_id: int, image_id: int) -> None:
    """The disk row removed and its image released, in one transaction."""
    vms.release_disk(open_catalog(), vm_id, image_id, writer=current_flow_run_id())


@task(**IO_TASK)
def finish_terminate(vm_id: int) -> vms.Vm:
    return vms.finish_terminate(open_catalog(), vm_id)
