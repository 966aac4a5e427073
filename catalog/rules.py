"""The image lifecycle (image-rules.md) as pure functions.

Each rule takes the image as it is and returns the fields to change (always including `state`),
or raises `Refused` with the message a user sees. The store applies the returned changes with
one compare-and-set, so a rule never needs to think about concurrency.
"""

from __future__ import annotations

from catalog.model import Image, ImageState, ImageType, Refused, utcnow

S = ImageState

LOCKED_STATES = (S.LOCKED, S.LOCKED_USED, S.LOCKED_USED_PERS)
IN_USE_STATES = (S.USED, S.USED_PERS, S.LOCKED_USED, S.LOCKED_USED_PERS)

# After a file operation succeeds, a locked image goes back to what its VMs need.
_UNLOCKED = {S.LOCKED: S.READY, S.LOCKED_USED: S.USED, S.LOCKED_USED_PERS: S.USED_PERS}


def _refuse_state(image: Image, action: str) -> Refused:
    return Refused(f"Cannot {action} image {image.id}, it is in state {image.state.value}.")


def error_message(reason: str) -> str:
    """The ERROR message format users know: '<timestamp> : <reason>'."""
    return f"{utcnow().strftime('%a %b %d %H:%M:%S %Y')} : {reason}"


def _released_state(image: Image, running_vms: int, cloning_ops: int) -> ImageState:
    """Where an image rests once VMs and clones let go of it."""
    if running_vms > 0:
        return S.USED_PERS if image.persistent else S.USED
    if cloning_ops > 0:
        return S.CLONE if image.persistent else S.USED
    return S.READY


# --- file operations -------------------------------------------------------------------------

def unlock(image: Image, **recorded) -> dict:
    """A file operation (copy, create, clone target) succeeded; `recorded` are its results
    (source, size, sha256, ...)."""
    if image.state not in _UNLOCKED:
        raise _refuse_state(image, "unlock")
    return {"state": _UNLOCKED[image.state], "error": None, "last_operation": None, **recorded}


def record(image: Image, **fields) -> dict:
    """Record facts about an image without moving it (e.g. the inspected source of an upload)."""
    return {"state": image.state, **fields}


def fail(image: Image, reason: str) -> dict:
    """A file operation failed: ERROR with the timestamped reason (waiting VMs fail too)."""
    if image.state not in LOCKED_STATES:
        raise _refuse_state(image, "mark as failed")
    return {"state": S.ERROR, "error": error_message(reason)}


def retry(image: Image) -> dict:
    """Re-run the operation that left the image in ERROR (our addition to the model)."""
    if image.state is not S.ERROR:
        raise Refused(f"Image {image.id} is in state {image.state.value}: only an image in ERROR can be retried.")
    if not image.last_operation:
        raise Refused(
            f"Image {image.id} records no failed operation to retry (its error came from a VM); "
            "use `enable` or `delete` instead."
        )
    target = S.DELETE if image.last_operation["op"] == "delete" else S.LOCKED
    return {"state": target}


# --- clone -----------------------------------------------------------------------------------

def clone_source_acquire(image: Image, clone_id: int) -> dict:
    if image.state not in (S.READY, S.USED, S.CLONE):
        raise _refuse_state(image, "clone")
    if image.persistent and image.snapshots:
        raise Refused(f"Cannot clone image {image.id}: it is persistent and has snapshots; flatten it first.")
    if image.state is S.READY:
        state = S.CLONE if image.persistent else S.USED
    else:
        state = image.state
    return {"state": state, "cloning_ops": image.cloning_ops + 1, "cloning_id": clone_id}


def clone_source_release(image: Image) -> dict:
    cloning_ops = max(image.cloning_ops - 1, 0)
    if image.state in (S.CLONE, S.USED):
        state = _released_state(image, image.running_vms, cloning_ops)
    else:  # e.g. DISABLED meanwhile: counters only
        state = image.state
    return {"state": state, "cloning_ops": cloning_ops}


# --- VMs -------------------------------------------------------------------------------------

def vm_acquire(image: Image, hot_attach: bool = False) -> dict:
    st = image.state
    if st is S.READY:
        return {"state": S.USED_PERS if image.persistent else S.USED, "running_vms": image.running_vms + 1}
    if st is S.USED:
        return {"state": S.USED, "running_vms": image.running_vms + 1}
    if st is S.USED_PERS:
        raise Refused(f"Cannot acquire image {image.id}: it is persistent and already in use.")
    if st in LOCKED_STATES:
        if hot_attach:
            raise Refused(f"Cannot acquire image {image.id}: it is locked.")
        if st is S.LOCKED_USED_PERS:
            raise Refused(f"Cannot acquire image {image.id}: it is persistent and already in use.")
        # The VM waits until the file operation unlocks the image.
        locked = S.LOCKED_USED_PERS if image.persistent else S.LOCKED_USED
        return {"state": locked, "running_vms": image.running_vms + 1}
    raise Refused(f"Cannot acquire image {image.id}, it is in state {st.value}.")


def vm_release(image: Image, failed: bool = False) -> dict:
    if image.running_vms <= 0:
        raise Refused(f"Image {image.id} has no VM to release.")
    running = image.running_vms - 1
    if failed:
        return {"state": S.ERROR, "running_vms": running,
                "error": error_message("A VM using the image failed; its data may be inconsistent")}
    if image.state in (S.LOCKED_USED, S.LOCKED_USED_PERS):
        return {"state": image.state if running else S.LOCKED, "running_vms": running}
    if image.state in (S.USED, S.USED_PERS):
        return {"state": _released_state(image, running, image.cloning_ops), "running_vms": running}
    return {"state": image.state, "running_vms": running}


# --- delete ----------------------------------------------------------------------------------

def delete(image: Image, *, force: bool, is_admin: bool) -> dict:
    st = image.state
    if st in IN_USE_STATES:
        raise Refused(f"Cannot delete image {image.id}: there are {image.running_vms} VMs using it.")
    if st is S.CLONE or image.cloning_ops:
        raise Refused(f"Cannot delete image {image.id}: there are {image.cloning_ops} active clone operations.")
    if st is S.LOCKED:
        if not force:
            raise Refused(
                f"Cannot delete image {image.id}: it is LOCKED by a running operation. "
                "Wait for it, or as an administrator use --force."
            )
        if not is_admin:
            raise Refused(f"Cannot delete image {image.id}: deleting a LOCKED image needs the ADMIN right.")
    if st not in (S.INIT, S.READY, S.DISABLED, S.ERROR, S.DELETE, S.LOCKED):
        raise _refuse_state(image, "delete")
    # The name is free again at once: a DELETE row holds no name slot.
    return {"state": S.DELETE, "name_slot": None}


def delete_failed(image: Image, reason: str) -> dict:
    if image.state is not S.DELETE:
        raise _refuse_state(image, "mark as failed to delete")
    return {"state": S.ERROR, "error": error_message(f"Error removing image from datastore: {reason}")}


# --- attributes ------------------------------------------------------------------------------

def enable(image: Image) -> dict:
    if image.state is S.DISABLED:
        return {"state": S.READY}
    if image.state is S.ERROR:
        return {"state": _released_state(image, image.running_vms, image.cloning_ops), "error": None}
    raise Refused(f"Cannot enable image {image.id}: only DISABLED or ERROR images can be enabled (it is {image.state.value}).")


def disable(image: Image) -> dict:
    if image.state not in (S.READY, S.ERROR):
        raise Refused(f"Cannot disable image {image.id}: only READY or ERROR images can be disabled (it is {image.state.value}).")
    return {"state": S.DISABLED}


_PERSISTENCY_STATES = (S.INIT, S.READY, S.DISABLED, S.LOCKED, S.ERROR, S.DELETE)


def set_persistent(image: Image, persistent: bool) -> dict:
    if image.type is ImageType.CDROM and persistent:
        raise Refused(f"Cannot make image {image.id} persistent: CDROM images are always non-persistent.")
    if image.state in IN_USE_STATES or image.running_vms:
        raise Refused(f"Cannot change persistency of image {image.id}: there are {image.running_vms} VMs using it.")
    if image.state is S.CLONE or image.cloning_ops:
        raise Refused(f"Cannot change persistency of image {image.id}: there are {image.cloning_ops} active clone operations.")
    if image.state not in _PERSISTENCY_STATES:
        raise _refuse_state(image, "change persistency of")
    if not persistent and image.snapshots:
        raise Refused(f"Cannot make image {image.id} non-persistent: it has snapshots; flatten it first.")
    return {"state": image.state, "persistent": persistent}


def validate_name(name: str) -> None:
    if not name or len(name) > 255 or name.strip() != name:
        raise Refused(f"Invalid image name {name!r}: use 1-255 characters without leading or trailing spaces.")


def rename(image: Image, new_name: str) -> dict:
    validate_name(new_name)
    if image.state is S.DELETE:
        raise _refuse_state(image, "rename")
    return {"state": image.state, "name": new_name, "name_slot": new_name}


_CHTYPE_STATES = (S.INIT, S.READY, S.DISABLED, S.ERROR)


def change_type(image: Image, new_type: ImageType) -> dict:
    if image.state not in _CHTYPE_STATES:
        raise Refused(
            f"Cannot change the type of image {image.id} in state {image.state.value}: "
            "it must be READY, DISABLED, INIT or ERROR (not used, locked or cloning)."
        )
    changes: dict = {"state": image.state, "type": new_type}
    if new_type is ImageType.CDROM:
        changes["persistent"] = False
    return changes


def validate_new_image(*, type_: ImageType, persistent: bool) -> None:
    if type_ is ImageType.CDROM and persistent:
        raise Refused("A CDROM image is always non-persistent: drop --persistent.")


def validate_empty_image(*, type_: ImageType) -> None:
    if type_ is ImageType.CDROM:
        raise Refused("A CDROM image cannot be created empty: give --path with an ISO file.")
