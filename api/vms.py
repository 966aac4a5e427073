"""The VM verbs: create, terminate, attach, detach, list, show. A VM is seen by its owner and
administrators only (anyone else's answers as a missing one, 404) and uses images it may USE.
Each verb lets the catalog decide (`catalog.vms`: template rules, acquire, release) and starts the
prolog or epilog flow; follow it at /runs/{flow_run_id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.auth import Caller
from api.shapes import Remote, Strict
from blocks.datastore import load_datastore
from catalog import rules, vms
from catalog.model import NotFound, Refused
from catalog.permissions import Actor, Right
from catalog.requests import VmDisksRequest
from catalog.settings import get_settings
from catalog.store import Catalog, open_catalog
from flows.launcher import submit

router = APIRouter(prefix="/api/v1", tags=["vms"])

ImageId = Annotated[int, Field(ge=0, le=2**31 - 1)]
MAX_DISKS = 32


def catalog() -> Catalog:
    return open_catalog()


class NewVm(Strict):
    name: str = Field(min_length=1, max_length=rules.MAX_NAME, description="Unique among your VMs")
    disks: list[ImageId] = Field(min_length=1, max_length=MAX_DISKS, description="Image ids, one of them an OS image")
    container: bool = Field(default=False, description="An LXD container: no DATABLOCK disk")


class Disk(Strict):
    image_id: ImageId


class VmStarted(BaseModel):
    """A VM operation handed to a flow run: follow it at /runs/{flow_run_id}, the VM at /vms/{name}."""

    flow_run_id: str
    vm: dict


def _check_system_datastore(actor: Actor, image_ids: list[int]) -> None:
    """Non-persistent disks are copied into the system datastore: refuse before anything moves
    when there is none."""
    images = [catalog().get_for(actor, image_id, Right.USE) for image_id in image_ids]
    if all(image.persistent for image in images):
        return
    name = get_settings().system_datastore
    try:
        load_datastore(name)
    except NotFound:
        raise Refused(f"Non-persistent disks are copied into the system datastore {name!r}, which does not exist: "
                      f"an administrator adds it (`hcx-image datastore add {name} --kind system ...`; "
                      "`hcx-image up` makes it on the embedded S3). Nothing was created.") from None


def _started(run_id: str, vm: vms.Vm) -> VmStarted:
    return VmStarted(flow_run_id=run_id, vm=vms.get(catalog(), vm.id).to_dict())


@router.get("/vms", summary="Your VMs (administrators: everyone's)")
def list_vms(actor: Caller, terminated: bool = Query(False, description="Terminated VMs too")) -> list[dict]:
    return [vm.to_dict() for vm in vms.list_vms(catalog(), actor, terminated=terminated)]


@router.get("/vms/{name}", summary="One of your VMs, with its disks")
def show_vm(name: str, actor: Caller) -> dict:
    return vms.by_name(catalog(), actor, name).to_dict()


@router.post("/vms", status_code=202, response_model=VmStarted,
             summary="Create a VM using images (USE on each): acquired at once, its disks made by the prolog flow")
def create_vm(body: NewVm, actor: Caller, remote: Remote = None) -> VmStarted:
    _check_system_datastore(actor, body.disks)
    vm = vms.create(catalog(), actor, body.name, body.disks, container=body.container)
    request = VmDisksRequest(owner=actor.user, vm_id=vm.id)
    return _started(submit("vm-prolog", {"request": request.model_dump(mode="json")}, remote=remote), vm)


@router.post("/vms/{name}/terminate", status_code=202, response_model=VmStarted,
             summary="Terminate a VM: copies deleted, images released (--failed: persistent images to ERROR)")
def terminate_vm(name: str, actor: Caller, remote: Remote = None,
                 failed: bool = Query(False, description="The VM failed while active: its persistent images "
                                                         "go to ERROR (their data may be inconsistent)")) -> VmStarted:
    vm = vms.begin_terminate(catalog(), actor, vms.by_name(catalog(), actor, name).id, failed=failed)
    request = VmDisksRequest(owner=actor.user, vm_id=vm.id)
    return _started(submit("vm-epilog", {"request": request.model_dump(mode="json")}, remote=remote), vm)


@router.post("/vms/{name}/attach", status_code=202, response_model=VmStarted,
             summary="Hot-attach an image to a RUNNING VM (a LOCKED image is refused)")
def attach_disk(name: str, body: Disk, actor: Caller, remote: Remote = None) -> VmStarted:
    vm = vms.by_name(catalog(), actor, name)
    _check_system_datastore(actor, [body.image_id])
    vm = vms.attach(catalog(), actor, vm.id, body.image_id)
    request = VmDisksRequest(owner=actor.user, vm_id=vm.id, image_ids=[body.image_id])
    return _started(submit("vm-prolog", {"request": request.model_dump(mode="json")}, remote=remote), vm)


@router.post("/vms/{name}/detach", status_code=202, response_model=VmStarted,
             summary="Detach a disk from a RUNNING VM: its copy deleted, its image released")
def detach_disk(name: str, body: Disk, actor: Caller, remote: Remote = None) -> VmStarted:
    vm = vms.begin_detach(catalog(), actor, vms.by_name(catalog(), actor, name).id, body.image_id)
    request = VmDisksRequest(owner=actor.user, vm_id=vm.id, image_ids=[body.image_id])
    return _started(submit("vm-epilog", {"request": request.model_dump(mode="json")}, remote=remote), vm)
