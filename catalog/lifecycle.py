"""The lifecycle as data: which state may follow which, and what must hold of every row.

`catalog.rules` decides what an operation does; this module is the safety net under every rule:
the store checks each write against `TRANSITIONS` and `check_invariants` before it commits, so a
rule that computes an impossible row fails loudly (a bug) instead of leaving the catalog wrong.
"""

from __future__ import annotations

from catalog.model import HcxError, Image, ImageState

S = ImageState


class BrokenInvariant(HcxError):
    """A write would leave the catalog in a state the lifecycle does not allow (a bug in a rule)."""


# Every state change a rule may make (staying in a state is always allowed: counters, records).
# Registering inserts LOCKED (or READY/INIT for rows made whole by a caller); a row is removed
# only from DELETE (the store's `remove`).
TRANSITIONS: dict[ImageState, frozenset[ImageState]] = {
    S.INIT: frozenset({S.LOCKED, S.READY, S.DISABLED, S.ERROR, S.DELETE}),
    # unlock, fail, a VM waiting on the operation, forced delete
    S.LOCKED: frozenset({S.READY, S.ERROR, S.LOCKED_USED, S.LOCKED_USED_PERS, S.DELETE}),
    S.LOCKED_USED: frozenset({S.USED, S.ERROR, S.LOCKED}),
    S.LOCKED_USED_PERS: frozenset({S.USED_PERS, S.ERROR, S.LOCKED}),
    # VM acquire, clone acquire, disable, delete; scrub or audit finding the bytes gone or damaged;
    # a snapshot operation (LOCKED while its objects move)
    S.READY: frozenset({S.USED, S.USED_PERS, S.CLONE, S.DISABLED, S.DELETE, S.ERROR, S.LOCKED}),
    # released back to READY; a failed VM or missing object -> ERROR
    S.USED: frozenset({S.READY, S.ERROR}),
    S.USED_PERS: frozenset({S.READY, S.ERROR}),
    S.CLONE: frozenset({S.READY, S.ERROR}),
    S.DISABLED: frozenset({S.READY, S.DELETE, S.ERROR}),
    # retry (into the failed operation), enable (to what the counters say), disable, delete
    S.ERROR: frozenset({S.LOCKED, S.LOCKED_USED, S.LOCKED_USED_PERS, S.DELETE, S.READY, S.USED, S.USED_PERS,
                        S.CLONE, S.DISABLED}),
    S.DELETE: frozenset({S.ERROR}),
}

INSERTABLE = frozenset({S.LOCKED, S.READY, S.INIT})

# States in which the image's bytes are in its datastore: the catalog must say where.
HOLDS_BYTES = frozenset({S.READY, S.USED, S.USED_PERS, S.CLONE})


def check_transition(before: ImageState | None, after: ImageState) -> None:
    """Refuse (as a bug) a state change the lifecycle does not have; `before` None: an insert."""
    if before is None:
        if after not in INSERTABLE:
            raise BrokenInvariant(f"A new image cannot start in state {after.value}.")
        return
    if after is not before and after not in TRANSITIONS[before]:
        raise BrokenInvariant(f"The lifecycle has no transition {before.value} -> {after.value}.")


def violations(image: Image, *, holds_name: bool) -> list[str]:
    """What is wrong with this row (empty when it is sound); `holds_name`: whether it keeps its name slot."""
    found = []
    st = image.state
    if image.running_vms < 0 or image.cloning_ops < 0:
        found.append(f"negative counters (RUNNING_VMS={image.running_vms}, CLONING_OPS={image.cloning_ops})")
    if st in (S.USED_PERS, S.LOCKED_USED_PERS) and (image.running_vms != 1 or not image.persistent):
        found.append(f"{st.value} means exactly one VM on a persistent image (RUNNING_VMS={image.running_vms})")
    if st in (S.USED, S.LOCKED_USED) and image.persistent:
        found.append(f"{st.value} is for non-persistent images")
    if st is S.USED and image.running_vms + image.cloning_ops == 0:
        found.append("USED with no VM and no clone counted")
    if st is S.LOCKED_USED and image.running_vms == 0:
        found.append("LOCKED_USED with no VM counted")
    if st is S.CLONE and (image.cloning_ops == 0 or image.running_vms != 0 or not image.persistent):
        found.append("CLONE means a persistent image with clones and no VM")
    if st in (S.READY, S.DISABLED, S.LOCKED) and (image.running_vms or image.cloning_ops):
        found.append(f"{st.value} with VMs or clones counted (RUNNING_VMS={image.running_vms}, "
                     f"CLONING_OPS={image.cloning_ops})")
    if st in HOLDS_BYTES and not image.source:
        found.append(f"{st.value} with no object recorded")
    if st is S.DELETE and holds_name:
        found.append("DELETE still holds its name")
    return found


def check_invariants(image: Image, *, holds_name: bool) -> None:
    if problems := violations(image, holds_name=holds_name):
        raise BrokenInvariant(f"Image {image.id} would be left unsound: {'; '.join(problems)}.")
