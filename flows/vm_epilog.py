"""VM epilog (terminate or detach): for each DETACHING disk -> delete its copy (non-persistent) ->
release its image, the disk row going in the same transaction -> the VM TERMINATED (a terminate).

A persistent image is released with its data kept (USED_PERS -> READY), or to ERROR when the VM
was terminated with --failed (its data may be inconsistent). A non-persistent image goes back to
READY once neither a VM nor a clone holds it. A failed epilog records the reason on the VM, which
keeps what it still holds: terminating (or detaching) again carries on.
"""

from __future__ import annotations

import logging


from catalog import vms
from catalog.model import HcxError
from catalog.requests import VmDisksRequest
from catalog.store import open_catalog
from flows.hooks import failure_reason, image_operation
from flows.vm_reporting import report_vm, vm_run_name
from tasks.vms import finish_terminate, release_disk, remove_copy

log = logging.getLogger("hcx.vm")


def _on_failure(flow, run, state) -> None:
    _record_failure(run, state)
    report_vm(flow, run, state)


def _record_failure(run, state) -> None:
    request = VmDisksRequest.model_validate(run.parameters["request"])
    try:
        vms.record_error(open_catalog(), request.vm_id, f"Epilog failed: {failure_reason(state)}")
    except HcxError:
        log.exception("could not record the failed epilog of VM %s", request.vm_id)


@image_operation("vm-epilog", run_name=lambda: vm_run_name("epilog"), on_failure=_on_failure, on_success=report_vm)
def vm_epilog(request: VmDisksRequest) -> int:
    """Let go of a VM's DETACHING disks (all of them: terminate; `image_ids`: detach): copies
    deleted, images released; a terminated VM ends TERMINATED."""
    vm = vms.get(open_catalog(), request.vm_id)
    for disk in vm.disks:
        if disk.state is not vms.DiskState.DETACHING:
            continue
        if request.image_ids is not None and disk.image_id not in request.image_ids:
            continue
        if disk.mode is vms.DiskMode.COPY and disk.object:
            remove_copy(disk.datastore, disk.object)
        release_disk(vm.id, disk.image_id)
    if request.image_ids is None:
        finish_terminate(vm.id)
    return vm.id
