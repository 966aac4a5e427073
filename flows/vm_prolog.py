"""VM prolog: for each disk the VM is to get -> wait while its image is LOCKED -> a link (persistent)
or a verified server-side copy into the system datastore (non-persistent) -> the VM RUNNING.

The images were acquired when the VM was created (or the disk attached), in the same transaction
as its disk rows (`catalog.vms`). A disk whose image goes to ERROR while the VM waits fails the
run; so does a copy that fails. The failure hook then removes the copies this VM's failing disks
have (their places are recorded before their first byte), and releases their images with the
reason: a VM being created goes FAILED, a running VM keeps its other disks (a failed attach).
"""

from __future__ import annotations

import logging


from blocks.datastore import ObjectRef, load_datastore
from catalog import vms
from catalog.model import HcxError
from catalog.requests import VmDisksRequest
from catalog.store import open_catalog
from flows.hooks import failure_reason, image_operation
from flows.vm_reporting import report_vm, vm_run_name
from tasks.objects import copy_into_datastore, remove_objects
from tasks.vms import copy_made, copy_target, link_disk, start_vm, wait_for_image

log = logging.getLogger("hcx.vm")


def _on_failure(flow, run, state) -> None:
    _release_on_failure(run, state)
    report_vm(flow, run, state)


def _release_on_failure(run, state) -> None:
    request = VmDisksRequest.model_validate(run.parameters["request"])
    catalog = open_catalog()
    vm = vms.find(catalog, request.vm_id)
    if vm is None:
        return
    reason = failure_reason(state)
    failing = [d for d in vm.disks if request.image_ids is None or vm.state is vms.VmState.PENDING
               or d.image_id in request.image_ids]
    try:
        for disk in failing:
            if disk.mode is vms.DiskMode.COPY and disk.object and disk.state is not vms.DiskState.DETACHING:
                remove_objects(load_datastore(disk.datastore), [ObjectRef.parse(disk.datastore, disk.object)])
        vms.fail(catalog, vm.id, request.image_ids, reason, writer=str(run.id))
    except HcxError:
        log.exception("could not release the disks of VM %s after its prolog failed", vm.id)


def make_disk(vm_id: int, disk: vms.VmDisk) -> None:
    if not wait_for_image(vm_id, disk.image_id):
        return  # the VM was terminated meanwhile: its epilog releases the image
    if disk.mode is vms.DiskMode.LINK:
        link_disk(vm_id, disk.image_id)
        return
    dst = copy_target(vm_id, disk.image_id)
    if dst is None:
        return
    image = open_catalog().get(disk.image_id)
    copy_into_datastore(src=ObjectRef.parse(image.datastore, image.source), dst=dst, etag=image.source_etag,
                        size=image.size, sha256=image.sha256)
    copy_made(vm_id, disk.image_id, dst)


@image_operation("vm-prolog", run_name=lambda: vm_run_name("prolog"), on_failure=_on_failure, on_success=report_vm)
def vm_prolog(request: VmDisksRequest) -> int:
    """Make a VM's disks (all, or those of `image_ids` for an attach): links to persistent images,
    verified copies of non-persistent ones in the system datastore; then the VM is RUNNING."""
    vm = vms.get(open_catalog(), request.vm_id)
    for disk in vm.disks:
        if disk.state is not vms.DiskState.READY and (request.image_ids is None or disk.image_id in request.image_ids):
            make_disk(vm.id, disk)
    start_vm(vm.id)
    return vm.id
