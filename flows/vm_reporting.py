"""What a VM flow leaves behind besides the images' report (`flows.reporting`, added to every
deployable flow): an event on the VM (`hcx.vm.running`, `hcx.vm.failed`, `hcx.vm.terminated`, ...)
and a table artifact of its disks, each with its image's state and counters. Like every report, it
never turns an outcome into another failure, and carries no credential."""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event
from prefect.runtime import flow_run

from catalog import vms
from catalog.model import human_size
from catalog.requests import VmDisksRequest
from catalog.store import open_catalog
from flows.reporting import publish_table, redact

log = logging.getLogger("hcx.vm")


def vm_run_name(flow_kind: str) -> str:
    """The run's name: `vm prolog 7` (a whole VM), `vm epilog 7 disks 3, 4` (an attach or detach)."""
    request = VmDisksRequest.model_validate(flow_run.parameters["request"])
    only = f" disks {', '.join(map(str, request.image_ids))}" if request.image_ids else ""
    return f"vm {flow_kind} {request.vm_id}{only}"


def disk_rows(vm: vms.Vm) -> list[dict[str, Any]]:
    catalog = open_catalog()
    rows = []
    for disk in vm.disks:
        image = catalog.find(disk.image_id)
        rows.append({"vm": vm.name, "image": disk.image_id, "type": disk.image_type.value, "mode": disk.mode.value,
                     "disk state": disk.state.value, "object": disk.object or "-",
                     "image state": image.state.value if image else "-",
                     "running vms": image.running_vms if image else "-",
                     "size": human_size(image.size) if image else "-"})
    if not rows:
        rows.append({"vm": vm.name, "image": "-", "type": "-", "mode": "-", "disk state": "-", "object": "-",
                     "image state": "-", "running vms": "-", "size": "-",
                     "note": f"{vm.state.value}: {redact(vm.error) if vm.error else 'no disk held'}"})
    return rows


def report_vm(flow, run, state) -> None:
    """State hook of the VM flows: the VM's event and its disks' table."""
    try:
        request = VmDisksRequest.model_validate(run.parameters["request"])
        vm = vms.find(open_catalog(), request.vm_id)
        if vm is None:
            return
        emit_event(event=f"hcx.vm.{vm.state.value.lower()}",
                   resource={"prefect.resource.id": f"hcx.vm.{vm.id}", "prefect.resource.name": vm.name},
                   related=[{"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.role": "flow-run"},
                            *({"prefect.resource.id": f"hcx.image.{d.image_id}", "prefect.resource.role": "disk"}
                              for d in vm.disks)],
                   payload={"operation": flow.name, "flow_run_id": str(run.id), "state": vm.state.value,
                            "owner": vm.owner, "error": redact(vm.error) if vm.error else None,
                            "disks": [d.to_dict() for d in vm.disks]})
        publish_table(f"{flow.name}-disks", disk_rows(vm),
                      f"Disks of VM {vm.name} after {flow.name} run {run.name} ({state.name})", str(run.id))
    except Exception:  # a report must never turn an outcome into another failure
        log.exception("could not report the VM of flow run %s", run.id)
