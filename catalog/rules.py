"""The image lifecycle (image-rules.md) as pure functions.

Each rule takes the image as it is and returns the fields to change (always including `state`),
or raises `Refused` with the message a user sees. The store applies the returned changes with
one compare-and-set, so a rule never needs to think about concurrency.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Collection

from catalog.model import (
    Bus, Changes, DiskFormat, Image, ImageState, ImageType, Operation, OperationRecord, PermissionDenied, Quota,
    QuotaUsage, Refused, Superseded, human_size, utcnow,
)
from catalog.permissions import ADMIN_BITS, DEFAULT_UMASK, Actor

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

def unlock(image: Image, **recorded) -> Changes:
    """A file operation (copy, create, clone target) succeeded; `recorded` are its results
    (source, size, sha256, ...)."""
    if image.state not in _UNLOCKED:
        raise _refuse_state(image, "unlock")
    return {"state": _UNLOCKED[image.state], "error": None, "last_operation": None, **recorded}


def record(image: Image, **fields) -> Changes:
    """Record what a file operation found or made (its bytes' place, sizes, sha256) without moving
    the image: only while the image waits on that operation."""
    if image.state not in LOCKED_STATES:
        raise _refuse_state(image, "record the results of a file operation on")
    return {"state": image.state, **fields}


def claim(image: Image, run_id: str, operation: Operation | None = None) -> Changes:
    """A flow run of `operation` takes up the operation the image waits on (after a retry, or a
    delete marked by the CLI): it becomes the image's one writer. Only an operation nobody owns,
    and only the one the image waits on, can be taken up; taking up one's own again changes nothing."""
    if image.state not in LOCKED_STATES and image.state is not S.DELETE:
        raise _refuse_state(image, "carry on an operation on")
    waits_on = image.last_operation.op if image.last_operation else None
    if operation is not None and waits_on is not None and waits_on is not operation:
        raise Superseded(f"Image {image.id} waits on its {waits_on.value}; a run of {operation.value} cannot "
                         f"take it up: flow run {run_id} changed nothing.")
    if image.flow_run_id not in (None, run_id):
        raise Superseded(f"Image {image.id} is being handled by flow run {image.flow_run_id}; "
                         f"flow run {run_id} changed nothing.")
    return {"state": image.state, "flow_run_id": run_id}


def owned_by(image: Image, run_id: str | None) -> None:
    """The fence of every write made for an operation: only the run that owns the image writes."""
    if run_id is not None and image.flow_run_id != run_id:
        raise Superseded(f"Image {image.id} is now handled by "
                         f"{f'flow run {image.flow_run_id}' if image.flow_run_id else 'no flow run yet'}; "
                         f"flow run {run_id} was superseded and changed nothing.")


def fail(image: Image, reason: str) -> Changes:
    """A file operation failed: ERROR with the timestamped reason (waiting VMs fail too)."""
    if image.state not in LOCKED_STATES:
        raise _refuse_state(image, "mark as failed")
    return {"state": S.ERROR, "error": error_message(reason)}


def retry(image: Image) -> Changes:
    """Re-run the operation that left the image in ERROR (our addition to the model).
    A failed delete goes back to DELETE; any other operation locks the image again, and a clone
    target takes its source again (`cloning_id`; the caller acquires that source in the same
    compare-and-set, see `clone_source_acquire`)."""
    if image.state is not S.ERROR:
        raise Refused(f"Image {image.id} is in state {image.state.value}: only an image in ERROR can be retried.")
    last = image.last_operation
    if last is None:
        raise Refused(
            f"Image {image.id} records no failed operation to retry (its error came from a VM); "
            "use `enable` or `delete` instead."
        )
    op = last.op
    # No run carries the operation yet: the one that will takes it up explicitly (`claim`), so the
    # failed run's id does not stay on an image that waits on another.
    if op is Operation.DELETE:  # a DELETE row holds no name (a rename in ERROR took one)
        return {"state": S.DELETE, "error": None, "flow_run_id": None, "name_held": False}
    if image.running_vms:
        locked = S.LOCKED_USED_PERS if image.persistent else S.LOCKED_USED
    else:
        locked = S.LOCKED
    changes = {"state": locked, "error": None, "flow_run_id": None}
    if op is Operation.CLONE:
        changes["cloning_id"] = int(last.request["source_id"])
    return changes


# --- clone -----------------------------------------------------------------------------------
# A clone target holds one clone operation on its source exactly while its `cloning_id` (the
# source's id) is set: set together with the source's CLONING_OPS+1, cleared together with the
# -1, always in one compare-and-set over both rows. A source's own `cloning_id` records its most
# recent clone while CLONING_OPS > 0.

def clone_source_acquire(image: Image, clone_id: int) -> Changes:
    if image.state not in (S.READY, S.USED, S.CLONE):
        raise _refuse_state(image, "clone")
    if image.persistent and image.snapshots:
        raise Refused(f"Cannot clone image {image.id}: it is persistent and has snapshots; flatten it first.")
    if not image.source or not image.source_etag:
        raise Refused(f"Image {image.id} records no object to clone from (it was never copied into its datastore).")
    if image.state is S.READY:
        state = S.CLONE if image.persistent else S.USED
    else:
        state = image.state
    return {"state": state, "cloning_ops": image.cloning_ops + 1, "cloning_id": clone_id}


def clone_source_release(image: Image) -> Changes:
    cloning_ops = max(image.cloning_ops - 1, 0)
    if image.state in (S.CLONE, S.USED):
        state = _released_state(image, image.running_vms, cloning_ops)
    else:  # e.g. ERROR meanwhile (a VM failed): counters only
        state = image.state
    changes = {"state": state, "cloning_ops": cloning_ops}
    if cloning_ops == 0:
        changes["cloning_id"] = None
    return changes


def held_clone_source(image: Image) -> int | None:
    """The source image this clone target holds a clone operation on, if any."""
    if image.cloning_id is not None and image.cloning_ops == 0:
        return image.cloning_id
    return None


def new_image(*, actor: Actor, name: str, type_: ImageType, persistent: bool, bus: Bus, format_: DiskFormat,
              datastore: str, run_id: str | None, upload_id: str | None, **fields) -> Image:
    """A new image, LOCKED while the operation that makes it runs (owned by `run_id`): the
    creation rules checked, permissions from the default umask."""
    validate_new_image(type_=type_, persistent=persistent)
    validate_name(name)
    validate_description(fields.get("description", ""))
    validate_attributes(fields.get("attributes", {}))
    return Image(id=0, name=name, owner=actor.user, group=actor.group, type=type_, persistent=persistent, bus=bus,
                 format=format_, datastore=datastore, state=fields.pop("state", S.LOCKED),
                 permissions=0o777 & ~DEFAULT_UMASK, flow_run_id=run_id, upload_id=upload_id, **fields)


def new_clone(source: Image, *, actor: Actor, name: str, datastore: str | None, persistent: bool,
              description: str | None, object_id: str, run_id: str | None,
              operation: OperationRecord | None) -> Image:
    """A clone target: LOCKED with CLONING_ID the source, inheriting type, format, bus, sizes and
    the sha256 (the copy verifies them)."""
    return new_image(
        actor=actor, name=name, type_=source.type, persistent=persistent, bus=source.bus, format_=source.format,
        datastore=datastore or source.datastore, run_id=run_id, upload_id=object_id,
        description=source.description if description is None else description,
        attributes=dict(source.attributes), size=source.size, virtual_size=source.virtual_size,
        sha256=source.sha256, cloning_id=source.id, last_operation=operation,
    )


def clone_resume(target: Image) -> None:
    """A clone run re-started for a target it already registered: only while it still holds its source."""
    if target.state not in LOCKED_STATES or held_clone_source(target) is None:
        raise Refused(
            f"Image {target.id} is in state {target.state.value}: its clone is not running; "
            "`retry` it if it failed."
        )


def finish_clone(target: Image, source: Image | None, error: str | None) -> tuple[Changes | None, Changes | None]:
    """End of a clone (success when `error` is None): the target is unlocked, or goes to ERROR
    with "Error cloning from Image N: ..."; the source is released in both cases. A target that
    left LOCKED meanwhile (force-deleted) only lets go of its source. Returns the changes of
    (target, source); None where there is nothing to change (already finished)."""
    source_id = held_clone_source(target)
    if source_id is None:
        return None, None
    if target.state in LOCKED_STATES:
        if error is None:
            changes = {**unlock(target), "cloning_id": None}
        else:
            changes = {**fail(target, f"Error cloning from Image {source_id}: {error}"), "cloning_id": None}
    else:
        changes = {"state": target.state, "cloning_id": None}
    return changes, (clone_source_release(source) if source is not None else None)


# --- VMs -------------------------------------------------------------------------------------

def vm_acquire(image: Image, hot_attach: bool = False) -> Changes:
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


def vm_release(image: Image, failed: bool = False) -> Changes:
    if image.running_vms <= 0:
        raise Refused(f"Image {image.id} has no VM to release.")
    running = image.running_vms - 1
    if failed:
        return {"state": S.ERROR, "running_vms": running, "last_operation": None,
                "error": error_message("A VM using the image failed; its data may be inconsistent")}
    if image.state in (S.LOCKED_USED, S.LOCKED_USED_PERS):
        return {"state": image.state if running else S.LOCKED, "running_vms": running}
    if image.state in (S.USED, S.USED_PERS):
        return {"state": _released_state(image, running, image.cloning_ops), "running_vms": running}
    return {"state": image.state, "running_vms": running}


# --- snapshots ---------------------------------------------------------------------------------
# A snapshot operation (create, revert, delete, flatten) holds the image LOCKED, owned by its flow
# run, while objects move, and always ends in READY: a failure records its error there.

def snapshot_begin(image: Image, action: str, run_id: str | None) -> Changes:
    """READY -> LOCKED for a snapshot operation (`action`: what the user asked, for the message)."""
    if image.type is ImageType.CDROM:
        raise Refused(f"Cannot {action} image {image.id}: it is a CDROM; only OS and DATABLOCK images have snapshots.")
    if image.state is not S.READY:
        raise Refused(f"Cannot {action} image {image.id}, it is in state {image.state.value}: snapshots are taken, "
                      "reverted, deleted and flattened only while the image is READY (no VM, no clone, no operation).")
    return {"state": S.LOCKED, "flow_run_id": run_id}


def snapshot_end(image: Image, reason: str | None = None, **recorded) -> Changes:
    """A snapshot operation ended: back to READY, with its error recorded when it failed (`reason`)."""
    if image.state is not S.LOCKED:
        raise _refuse_state(image, "end a snapshot operation on")
    return {"state": S.READY, "error": error_message(reason) if reason else None, "last_operation": None,
            **recorded}


def validate_snapshot_name(name: str) -> None:
    """Like an image name, and not only digits: a snapshot is named by its name or its number."""
    validate_name(name)
    if name.isdigit():
        raise Refused(f"Invalid snapshot name {name!r}: a name of digits only would read as a snapshot number; "
                      "add a letter.")
    if "/" in name:
        raise Refused(f"Invalid snapshot name {_shown(name)}: it names the snapshot in URLs, so it cannot contain '/'.")


# --- delete ----------------------------------------------------------------------------------

def delete(image: Image, *, force: bool, is_admin: bool) -> Changes:
    st = image.state
    # VMs first, then clones: a non-persistent image being cloned rests in USED with no VM, and
    # its users need to hear about the clones (the reference says "0 VMs using it" there).
    if image.running_vms or st in (S.USED_PERS, S.LOCKED_USED, S.LOCKED_USED_PERS):
        raise Refused(f"Cannot delete image {image.id}: There are {image.running_vms} VMs using it.")
    if st is S.CLONE or image.cloning_ops:
        raise Refused(f"Cannot delete image {image.id}: There are {image.cloning_ops} active clone operations.")
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
    # The name is free again at once: a DELETE row holds no name slot. The run that removes the
    # objects takes the image up (`claim`); a forced delete first stops the run it supersedes.
    superseded = image.flow_run_id if st is S.LOCKED else None
    if st is S.DELETE and image.last_operation:  # deleting again: what the first had to stop still must stop
        superseded = image.last_operation.stops_run
    return {"state": S.DELETE, "name_held": False, "flow_run_id": None,
            "last_operation": OperationRecord(op=Operation.DELETE, stops_run=superseded)}


def delete_failed(image: Image, reason: str) -> Changes:
    """Removing the objects failed: ERROR, and `retry` runs the delete again. The name stays free."""
    if image.state is not S.DELETE:
        raise _refuse_state(image, "mark as failed to delete")
    return {"state": S.ERROR, "error": error_message(f"Error removing image from datastore: {reason}"),
            "last_operation": OperationRecord(
                op=Operation.DELETE, stops_run=image.last_operation.stops_run if image.last_operation else None)}


# --- attributes ------------------------------------------------------------------------------

# Leaving ERROR other than by a retry ends the failed operation (nothing left to retry), and an
# image whose delete failed takes its name back (refused if another image took it meanwhile).
# A failed clone that still holds its source (its hooks never ran) must be retried or deleted.
def _leave_error(image: Image) -> Changes:
    if image.state is not S.ERROR:
        return {}
    if held_clone_source(image) is not None:
        raise Refused(f"Image {image.id} still holds image {image.cloning_id}, the source of its failed clone: "
                      "`retry` or `delete` it.")
    return {"error": None, "last_operation": None, "name_held": True}


def enable(image: Image) -> Changes:
    """DISABLED -> READY; ERROR -> what the counters say (READY only with no VM and no clone).
    An image whose bytes never reached its datastore cannot be enabled: nothing would be READY."""
    if image.state not in (S.DISABLED, S.ERROR):
        raise Refused(f"Cannot enable image {image.id}: only DISABLED or ERROR images can be enabled "
                      f"(it is {image.state.value}).")
    leaving_error = _leave_error(image)
    if not image.source:
        raise Refused(f"Cannot enable image {image.id}: its bytes never reached its datastore. "
                      "`retry` the operation that failed, or `delete` the image.")
    return {"state": _released_state(image, image.running_vms, image.cloning_ops), **leaving_error}


def disable(image: Image) -> Changes:
    if image.state not in (S.READY, S.ERROR):
        raise Refused(f"Cannot disable image {image.id}: only READY or ERROR images can be disabled (it is {image.state.value}).")
    if image.running_vms:
        raise Refused(f"Cannot disable image {image.id}: There are {image.running_vms} VMs using it.")
    if image.cloning_ops:
        raise Refused(f"Cannot disable image {image.id}: There are {image.cloning_ops} active clone operations.")
    return {"state": S.DISABLED, **_leave_error(image)}


_PERSISTENCY_STATES = (S.INIT, S.READY, S.DISABLED, S.LOCKED, S.ERROR, S.DELETE)


def set_persistent(image: Image, persistent: bool) -> Changes:
    if image.type is ImageType.CDROM:
        raise Refused(f"Cannot change persistency of image {image.id}: CDROM images are always non-persistent.")
    if image.state in IN_USE_STATES or image.running_vms:
        raise Refused(f"Cannot change persistency of image {image.id}: There are {image.running_vms} VMs using it.")
    if image.state is S.CLONE or image.cloning_ops:
        raise Refused(f"Cannot change persistency of image {image.id}: There are {image.cloning_ops} active clone operations.")
    if image.state not in _PERSISTENCY_STATES:
        raise _refuse_state(image, "change persistency of")
    if not persistent and image.snapshots:
        raise Refused(f"Cannot make image {image.id} non-persistent: it has snapshots; flatten it first.")
    return {"state": image.state, "persistent": persistent}


# --- bounds of what a user names and describes -------------------------------------------------

MAX_NAME = 128
MAX_DESCRIPTION_BYTES = 4 * 1024
MAX_ATTRIBUTES = 128
MAX_ATTRIBUTE_VALUE_BYTES = 1024
ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Characters a terminal would act on or hide instead of show: controls (ESC, CR, ...), format
# characters (bidi overrides, zero-width ones) and line or paragraph separators.
_UNSHOWN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _shown(text: str, limit: int = 40) -> str:
    """A user's text quoted for a message: escaped (repr) and cut short."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def validate_name(name: str) -> None:
    if not name or len(name) > MAX_NAME or name.strip() != name:
        raise Refused(f"Invalid image name {_shown(name)} ({len(name)} characters): use 1-{MAX_NAME} characters "
                      "without leading or trailing spaces.")
    if any(unicodedata.category(c) in _UNSHOWN_CATEGORIES for c in name):
        raise Refused(f"Invalid image name {_shown(name)}: it contains control or invisible formatting characters "
                      "(escapes, bidi overrides, zero-width or line separators); use printable characters only.")


def validate_description(description: str) -> None:
    if (size := len(description.encode())) > MAX_DESCRIPTION_BYTES:
        raise Refused(f"The description is {size} bytes long: at most {MAX_DESCRIPTION_BYTES} bytes (4 KiB) are "
                      "kept; shorten it.")


def validate_attributes(attributes: dict[str, str]) -> None:
    for key, value in attributes.items():
        validate_attribute(key, value)
    if len(attributes) > MAX_ATTRIBUTES:
        raise Refused(f"An image has at most {MAX_ATTRIBUTES} attributes and this one would have "
                      f"{len(attributes)}: unset some first.")


def validate_attribute(key: str, value: str) -> None:
    if not isinstance(key, str) or not ATTRIBUTE_KEY.fullmatch(key):
        raise Refused(f"Invalid attribute name {_shown(str(key))}: use 1-64 letters, digits, '_', '.' or '-'.")
    if not isinstance(value, str):
        raise Refused(f"Attribute {key}: its value must be text.")
    if (size := len(value.encode())) > MAX_ATTRIBUTE_VALUE_BYTES:
        raise Refused(f"Attribute {key}: its value is {size} bytes long, at most {MAX_ATTRIBUTE_VALUE_BYTES} "
                      "(1 KiB) are kept; shorten it.")


def rename(image: Image, new_name: str) -> Changes:
    validate_name(new_name)
    if image.state is S.DELETE:
        raise _refuse_state(image, "rename")
    return {"state": image.state, "name": new_name, "name_held": True}


def update(image: Image, *, description: str | None = None, set_attributes: dict[str, str] | None = None,
           unset: list[str] | tuple[str, ...] = ()) -> Changes:
    """Change the description and the free attributes (KEY=VALUE); the state stays."""
    if image.state is S.DELETE:
        raise _refuse_state(image, "update")
    attributes = {**image.attributes, **(set_attributes or {})}
    for key in unset:
        if key not in attributes:
            raise Refused(f"Image {image.id} has no attribute {_shown(key)} to unset.")
        del attributes[key]
    validate_attributes(attributes)
    changes: Changes = {"state": image.state, "attributes": attributes}
    if description is not None:
        validate_description(description)
        changes["description"] = description
    return changes


_CHTYPE_STATES = (S.INIT, S.READY, S.DISABLED, S.ERROR)


def change_type(image: Image, new_type: ImageType) -> Changes:
    if image.state not in _CHTYPE_STATES:
        raise Refused(
            f"Cannot change the type of image {image.id} in state {image.state.value}: "
            "it must be READY, DISABLED, INIT or ERROR (not used, locked or cloning)."
        )
    if new_type is ImageType.CDROM and image.snapshots:
        raise Refused(f"Cannot make image {image.id} a CDROM: it has {image.snapshots} snapshots and CDROMs have none; "
                      "flatten it first.")
    changes: Changes = {"state": image.state, "type": new_type}
    if new_type is ImageType.CDROM:
        changes["persistent"] = False
    return changes


def validate_new_image(*, type_: ImageType, persistent: bool) -> None:
    if type_ is ImageType.CDROM and persistent:
        raise Refused("A CDROM image is always non-persistent: drop --persistent.")


def validate_empty_image(*, type_: ImageType) -> None:
    if type_ is ImageType.CDROM:
        raise Refused("A CDROM image cannot be created empty: give --path with an ISO file.")


# --- ownership and permissions ---------------------------------------------------------------

def chmod(image: Image, mode: int, *, may_change_admin_bits: bool) -> Changes:
    """New permission bits (octal like Unix); the ADMIN bits change only with the ADMIN right."""
    if not 0 <= mode <= 0o777:
        raise Refused(f"Invalid permissions {mode:o}: use three octal digits, 000 to 777 (e.g. 640).")
    if image.state is S.DELETE:
        raise _refuse_state(image, "change the permissions of")
    if (mode ^ image.permissions) & ADMIN_BITS and not may_change_admin_bits:
        raise PermissionDenied(
            f"Changing the ADMIN bits of image {image.id} (the 1 of each octal digit) needs the ADMIN right on it: "
            f"keep them as they are ({image.permissions & ADMIN_BITS:03o}), or ask an administrator."
        )
    return {"state": image.state, "permissions": mode}


def chown(image: Image, actor: Actor, *, owner: str, group: str) -> Changes:
    """A new owner (administrators only: giving an image away) and group (see `chgrp`). The new
    owner must not already hold the image's name: the store's name slot refuses it."""
    if owner != image.owner and not actor.is_admin:
        raise PermissionDenied(f"Only an administrator may give image {image.id} to another user ({owner}): "
                               "ask one, or let that user clone the image.")
    return {**chgrp(image, actor, group=group), "owner": owner}


def chgrp(image: Image, actor: Actor, *, group: str) -> Changes:
    """A new group: one of the actor's own groups, or any for an administrator."""
    if image.state is S.DELETE:
        raise _refuse_state(image, "change the owner or group of")
    if group != image.group and group not in actor.groups and not actor.is_admin:
        raise PermissionDenied(f"User {actor.user} is not in group {group}: an image can be given only to one "
                               "of your own groups (ask an administrator for another).")
    return {"state": image.state, "group": group}


# --- quotas ----------------------------------------------------------------------------------

_QUOTA_HINT = "delete an image or ask an administrator to raise it."


def check_quota(quota: Quota, usage: QuotaUsage, *, required_bytes: int, new_images: int = 1,
                what: str = "this image") -> None:
    """Refuse `new_images` more images (0: a snapshot) of `required_bytes` that the quota has no room for."""
    where = f"Quota of {quota.subject} on {quota.scope}"
    if new_images and quota.max_images is not None and usage.images + new_images > quota.max_images:
        left = max(quota.max_images - usage.images, 0)
        raise Refused(f"{where}: at most {quota.max_images} images, {usage.images} used, {left} left: {_QUOTA_HINT}")
    if quota.max_bytes is not None and usage.bytes + required_bytes > quota.max_bytes:
        left = max(quota.max_bytes - usage.bytes, 0)
        raise Refused(
            f"{where}: at most {human_size(quota.max_bytes)} ({quota.max_bytes} bytes), {human_size(usage.bytes)} "
            f"used, {human_size(left)} ({left} bytes) left, and {what} needs {human_size(required_bytes)} "
            f"({required_bytes} bytes): {_QUOTA_HINT}"
        )


# --- datastore capacity ----------------------------------------------------------------------

def capacity_limit(limit: int | None, *, skip: bool, is_admin: bool) -> int | None:
    """The capacity a new image must fit (None: unchecked); only an administrator may skip the check."""
    if skip and not is_admin:
        raise Refused("Only an administrator may skip the datastore capacity check: drop --skip-capacity-check.")
    return None if skip else limit


def check_capacity(*, datastore: str, limit: int | None, used: int, required: int, what: str = "this image") -> None:
    """Refuse an image (or a snapshot: `what`) that does not fit the datastore's LIMIT (None: no limit)."""
    if limit is not None and used + required > limit:
        free = max(limit - used, 0)
        raise Refused(
            f"Datastore {datastore} has no room for {what}: it needs {human_size(required)} "
            f"({required} bytes) and {human_size(free)} ({free} bytes) of its {human_size(limit)} limit are free. "
            "Delete images there, or choose another --datastore."
        )


# --- maintenance (the reconcile and scrub flows) ----------------------------------------------

def awaits_operation(image: Image) -> bool:
    """Whether the image waits on a file operation to move it on: LOCKED* or DELETE. (A clone
    source in CLONE waits on its clone targets, which are LOCKED: settling them releases it.)"""
    return image.state in LOCKED_STATES or image.state is S.DELETE


def abandon(image: Image, reason: str) -> Changes:
    """The operation the image waits on ended (or its process died) without moving it: what its
    failure would have done, ERROR with the reason. A clone target that still holds its source
    is finished with `finish_clone` instead, which releases the source in the same transaction."""
    if image.state in LOCKED_STATES:
        return fail(image, reason)
    if image.state is S.DELETE:
        return delete_failed(image, reason)
    raise _refuse_state(image, "abandon the operation of")


# States in which the image's bytes must be in its datastore.
_SETTLED_STATES = (S.READY, S.USED, S.USED_PERS, S.DISABLED, S.CLONE)


def holds_bytes(image: Image) -> bool:
    return image.state in _SETTLED_STATES and bool(image.source)


def check_staging_target(image: Image | None, run_id: str | None) -> None:
    """Staged bytes never land on a key a registered image uses: an upload id that belongs to an
    image may be staged again only to carry on that image's failed or pending upload (a retry),
    never over the bytes of a settled image nor under another run's operation."""
    if image is None:
        return
    last = image.last_operation
    carrying_on = (
        last is not None and last.op is Operation.UPLOAD
        and (image.state is S.ERROR or (image.state in LOCKED_STATES and image.flow_run_id in (None, run_id)))
    )
    if not carrying_on:
        raise Refused(f"Upload {image.upload_id} already belongs to image {image.id} ({image.state.value}): "
                      "nothing was staged; start a new upload.")


def check_import_bucket(actor: Actor, bucket: str, service_buckets: Collection[str]) -> None:
    """A tenant imports from buckets of its own, never from one where this service keeps images or
    staged uploads (any datastore's): read with the service's keys, it would hand them other
    tenants' bytes. Administrators may. Buckets are compared by name, whatever the endpoint: two
    spellings of one endpoint must not open a way round the rule."""
    if actor.is_admin or bucket not in service_buckets:
        return
    raise PermissionDenied(
        f"User {actor.user} may not import from bucket {bucket}: hcx-images keeps images or staged uploads "
        "there, and only administrators may import from the service's own buckets (other tenants' images lie "
        "in them). Import from a bucket of your own, or clone an image you may use (`hcx-image clone`)."
    )


def check_export(image: Image) -> None:
    """Bytes leave only when they are settled in the datastore (never while an operation moves them)."""
    if not holds_bytes(image):
        raise Refused(f"Image {image.id} is {image.state.value}: its bytes are not settled in its datastore, "
                      "so there is nothing to export yet.")


def object_missing(image: Image, where: str) -> Changes:
    """The image's object is gone from its datastore."""
    if image.state not in _SETTLED_STATES:
        raise _refuse_state(image, "mark as missing its object")
    return {"state": S.ERROR, "error": error_message(f"The image object {where} is missing from the datastore")}


def checksum_mismatch(image: Image, found_sha256: str) -> Changes:
    """Scrub re-hashed a READY image and found other bytes than those recorded."""
    if image.state is not S.READY:
        raise _refuse_state(image, "mark as damaged")
    return {"state": S.ERROR, "error": error_message(
        f"Checksum mismatch: the stored bytes hash to {found_sha256}, the catalog records {image.sha256}; "
        "the stored copy is damaged")}
