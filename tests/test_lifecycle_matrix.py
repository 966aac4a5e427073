"""Every lifecycle operation in every state, as image-rules.md's tables say (the expectations below
are written from the rules document, not from catalog/rules.py): allowed with the right resulting
state and counters, or refused with the right message and nothing changed (no row moved, no row
added, no history row). Rows are put in each state directly; the flows are tested elsewhere."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from catalog import operations
from catalog.model import Image, ImageState, ImageType, Refused
from catalog.requests import CloneRequest
from tests.conftest import ADMIN, ALICE, catalog_snapshot

S = ImageState

# What an image in each state looks like: the counters the rules imply for it. A persistent
# image in use is USED_PERS, and one being cloned is CLONE; an ERROR image failed an upload.
SHAPES: dict[ImageState, dict] = {
    S.INIT: {},
    S.READY: {},
    S.USED: {"running_vms": 1},
    S.DISABLED: {},
    S.LOCKED: {},
    S.ERROR: {"error": "Mon Nov 23 10:00:00 2026 : Error copying image in the datastore: boom",
              "last_operation": {"op": "upload", "upload_id": "u1", "request": {"owner": "alice", "name": "x"}}},
    S.CLONE: {"persistent": True, "cloning_ops": 1, "cloning_id": 999_999},
    S.DELETE: {},
    S.USED_PERS: {"persistent": True, "running_vms": 1},
    S.LOCKED_USED: {"running_vms": 1},
    S.LOCKED_USED_PERS: {"persistent": True, "running_vms": 1},
}


@dataclass(frozen=True)
class Allowed:
    state: ImageState
    fields: dict = field(default_factory=dict)  # other fields of the row after the operation


@dataclass(frozen=True)
class Refusal:
    message: str  # a fragment; "{id}" and "{state}" are filled in


def table(allowed: dict[ImageState, Allowed], refused: Refusal | dict[ImageState, Refusal]) -> dict:
    """Every state: allowed as given, else refused (one message for all, or per state)."""
    return {st: allowed.get(st) or (refused if isinstance(refused, Refusal) else refused[st]) for st in S}


VMS = Refusal("There are 1 VMs using it")
CLONES = Refusal("There are 1 active clone operations")


def _persistency(to: bool) -> dict:
    # Allowed in INIT, READY, DISABLED, LOCKED, ERROR, DELETE; refused while used or cloning.
    return table({st: Allowed(st, {"persistent": to}) for st in (S.INIT, S.READY, S.DISABLED, S.LOCKED, S.ERROR, S.DELETE)},
                 {S.USED: VMS, S.USED_PERS: VMS, S.LOCKED_USED: VMS, S.LOCKED_USED_PERS: VMS, S.CLONE: CLONES})


def _delete(locked: Allowed | Refusal) -> dict:
    # Allowed in INIT, READY (0 VMs), DISABLED, ERROR, DELETE; LOCKED only with ADMIN and force;
    # refused while used ("There are N VMs using it") or cloning ("N active clone operations").
    ok = {st: Allowed(S.DELETE) for st in (S.INIT, S.READY, S.DISABLED, S.ERROR, S.DELETE)}
    refusals = {S.USED: VMS, S.USED_PERS: VMS, S.LOCKED_USED: VMS, S.LOCKED_USED_PERS: VMS, S.CLONE: CLONES}
    if isinstance(locked, Allowed):
        ok[S.LOCKED] = locked
    else:
        refusals[S.LOCKED] = locked
    return table(ok, refusals)


EXPECTED: dict[str, dict[ImageState, Allowed | Refusal]] = {
    # Clone source: READY, USED or CLONE. Non-persistent READY -> USED; CLONING_OPS+1.
    "clone": table({S.READY: Allowed(S.USED, {"cloning_ops": 1}),
                    S.USED: Allowed(S.USED, {"cloning_ops": 1, "running_vms": 1}),
                    S.CLONE: Allowed(S.CLONE, {"cloning_ops": 2})},
                   Refusal("Cannot clone image {id}, it is in state {state}")),
    "delete": _delete(Refusal("it is LOCKED by a running operation")),
    "delete --force": _delete(Refusal("deleting a LOCKED image needs the ADMIN right")),
    "delete --force (admin)": _delete(Allowed(S.DELETE)),
    # Enable: DISABLED -> READY; ERROR -> the unlock rule (READY with no VM, no clone).
    "enable": table({S.DISABLED: Allowed(S.READY), S.ERROR: Allowed(S.READY, {"error": None})},
                    Refusal("only DISABLED or ERROR images can be enabled (it is {state})")),
    # Disable: READY or ERROR -> DISABLED.
    "disable": table({S.READY: Allowed(S.DISABLED), S.ERROR: Allowed(S.DISABLED)},
                     Refusal("only READY or ERROR images can be disabled (it is {state})")),
    "persistent": _persistency(True),
    "nonpersistent": _persistency(False),
    # Rename and update (MANAGE): anything but an image being deleted; the state stays.
    "rename": table({st: Allowed(st, {"name": "renamed"}) for st in S if st is not S.DELETE},
                    Refusal("Cannot rename image {id}, it is in state DELETE")),
    "update": table({st: Allowed(st, {"description": "new words", "attributes": {"OWNER_TEAM": "storage"}})
                     for st in S if st is not S.DELETE},
                    Refusal("Cannot update image {id}, it is in state DELETE")),
    # chtype: not used, locked or cloning.
    "chtype": table({st: Allowed(st, {"type": ImageType.DATABLOCK}) for st in (S.INIT, S.READY, S.DISABLED, S.ERROR)},
                    Refusal("Cannot change the type of image {id} in state {state}")),
    # Retry (ours): only an image in ERROR; the failed upload locks it again.
    "retry": table({S.ERROR: Allowed(S.LOCKED, {"error": None})},
                   Refusal("Image {id} is in state {state}: only an image in ERROR can be retried")),
}


def run_operation(catalog, name: str, image: Image, new_name: str) -> Image:
    """The catalog operation a CLI verb or a flow's first step performs."""
    if name == "clone":
        request = CloneRequest(owner=ALICE.user, group=ALICE.group, source_id=image.id, name=new_name)
        return operations.begin_clone(catalog, ALICE, request, object_id=new_name, limit_bytes=None, run_id=None)
    return {
        "delete": lambda: operations.delete(catalog, ALICE, image.id),
        "delete --force": lambda: operations.delete(catalog, ALICE, image.id, force=True),
        "delete --force (admin)": lambda: operations.delete(catalog, ADMIN, image.id, force=True),
        "enable": lambda: operations.enable(catalog, ALICE, image.id),
        "disable": lambda: operations.disable(catalog, ALICE, image.id),
        "persistent": lambda: operations.set_persistent(catalog, ALICE, image.id, True),
        "nonpersistent": lambda: operations.set_persistent(catalog, ALICE, image.id, False),
        "rename": lambda: operations.rename(catalog, ALICE, image.id, new_name),
        "update": lambda: operations.update(catalog, ALICE, image.id, description="new words",
                                            set_attributes={"OWNER_TEAM": "storage"}),
        "chtype": lambda: operations.change_type(catalog, ALICE, image.id, ImageType.DATABLOCK),
        "retry": lambda: operations.retry(catalog, ALICE, image.id),
    }[name]()


CASES = [(op, st) for op in EXPECTED for st in S]


@pytest.mark.parametrize("op, state", CASES, ids=[f"{op}-{st.value}" for op, st in CASES])
def test_operation_in_state(catalog, put_image, op, state):
    image = put_image(state, **SHAPES[state])
    new_name = f"new-{uuid.uuid4().hex[:10]}"
    expected = EXPECTED[op][state]
    before = catalog_snapshot(catalog)

    if isinstance(expected, Refusal):
        with pytest.raises(Refused) as refused:
            run_operation(catalog, op, image, new_name)
        assert expected.message.format(id=image.id, state=state.value) in str(refused.value)
        assert catalog_snapshot(catalog) == before
        assert catalog.find_by_upload_id(new_name) is None
        return

    result = run_operation(catalog, op, image, new_name)
    after = catalog.get(image.id)
    fields = dict(expected.fields)
    if fields.get("name") == "renamed":
        fields["name"] = new_name
    assert after.state is expected.state
    assert {k: getattr(after, k) for k in fields} == fields
    assert after.version == image.version + 1
    assert after.prev_state is (state if expected.state is not state else image.prev_state)
    history = catalog.history(image.id)
    assert [(h["from_state"], h["to_state"]) for h in history[-1:]] == [(state.value, expected.state.value)]
    untouched = {"running_vms", "cloning_ops", "persistent", "type", "name"} - fields.keys()
    assert {k: getattr(after, k) for k in untouched} == {k: getattr(image, k) for k in untouched}

    if op == "clone":  # the new image: LOCKED, holding its source, which records it
        assert (result.state, result.cloning_id, result.name) == (S.LOCKED, image.id, new_name)
        assert after.cloning_id == result.id
        assert (result.type, result.format, result.size, result.sha256) == (image.type, image.format,
                                                                            image.size, image.sha256)
        assert len(catalog.list()) == len(before[0]) + 1
    else:
        assert len(catalog.list()) == len(before[0])
    if expected.state is S.DELETE:  # the name is free at once
        assert catalog.name_owner(image.owner, image.name) is None
