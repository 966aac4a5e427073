"""The lifecycle operations and the plans behind them, each a thin layer over the catalog.

A user-facing operation checks the right it needs (USE for a clone source, MANAGE for the rest,
ADMIN to force-delete a LOCKED image), then lets a rule of `catalog.rules` decide inside
`Catalog.commit`, so a permission or a rule is judged on the same fresh rows the compare-and-set
writes. A plan that moves several rows (a clone and its source, a removed clone target and its
source) is one function here, decided once per attempt.

Writes made for a file operation are fenced by the flow run that owns the image (`owner`): a run
that was superseded (a retry or a forced delete took the image over) changes nothing.

The flows and the CLI call these; none of them decides a rule itself.
"""

from __future__ import annotations

from typing import Callable

from catalog import rules
from catalog.identity import Directory
from catalog.model import Image, ImageState, ImageType, NotFound, Operation, OperationRecord, Refused
from catalog.permissions import Actor, Right, check_access, has_right
from catalog.requests import CloneRequest
from catalog.store import NEW_IMAGE_ID, NEW_IMAGE_MARK, Catalog, Move, NewImage, Reader, Removal, Step


def _needs(actor: Actor, right: Right) -> Callable[[Image], None]:
    return lambda image: check_access(actor, image, right)


# --- byte-less operations ---------------------------------------------------------------------

def enable(catalog: Catalog, actor: Actor, image_id: int) -> Image:
    return catalog.transition(image_id, rules.enable, expect=_needs(actor, Right.MANAGE),
                              message=f"enabled by {actor.user}")


def disable(catalog: Catalog, actor: Actor, image_id: int) -> Image:
    return catalog.transition(image_id, rules.disable, expect=_needs(actor, Right.MANAGE),
                              message=f"disabled by {actor.user}")


def set_persistent(catalog: Catalog, actor: Actor, image_id: int, persistent: bool) -> Image:
    kind = "persistent" if persistent else "non-persistent"
    return catalog.transition(image_id, rules.set_persistent, persistent, expect=_needs(actor, Right.MANAGE),
                              message=f"made {kind} by {actor.user}")


def rename(catalog: Catalog, actor: Actor, image_id: int, new_name: str) -> Image:
    return catalog.transition(image_id, rules.rename, new_name, expect=_needs(actor, Right.MANAGE),
                              message=f"renamed to {new_name!r} by {actor.user}")


def update(catalog: Catalog, actor: Actor, image_id: int, *, description: str | None = None,
           set_attributes: dict[str, str] | None = None, unset: list[str] | tuple[str, ...] = ()) -> Image:
    return catalog.transition(image_id, rules.update, description=description, set_attributes=set_attributes,
                              unset=unset, expect=_needs(actor, Right.MANAGE), message=f"updated by {actor.user}")


def change_type(catalog: Catalog, actor: Actor, image_id: int, new_type: ImageType) -> Image:
    return catalog.transition(image_id, rules.change_type, new_type, expect=_needs(actor, Right.MANAGE),
                              message=f"type changed to {new_type.value} by {actor.user}")


# --- ownership and permissions -----------------------------------------------------------------

def chmod(catalog: Catalog, actor: Actor, image_id: int, mode: int) -> Image:
    """New permission bits: MANAGE, and ADMIN to change the ADMIN bits."""

    def chmod_rule(image: Image):
        return rules.chmod(image, mode, may_change_admin_bits=has_right(actor, image, Right.ADMIN))

    return catalog.transition(image_id, chmod_rule, expect=_needs(actor, Right.MANAGE),
                              message=f"permissions changed to {mode:03o} by {actor.user}")


def chown(catalog: Catalog, directory: Directory, actor: Actor, image_id: int, user: str,
          group: str | None = None) -> Image:
    """A new owner (and group; None keeps the image's): MANAGE, and administrators only to give the
    image to another user. Counted against the new owner's (and group's) quotas."""
    catalog.get_for(actor, image_id, Right.MANAGE)  # an invisible image answers as a missing one first
    _check_user_exists(directory, user)
    if group is not None:
        _check_group_exists(directory, group)

    def chown_rule(image: Image):
        return rules.chown(image, actor, owner=user, group=image.group if group is None else group)

    return catalog.transition(image_id, chown_rule, expect=_needs(actor, Right.MANAGE),
                              message=f"owner changed to {user}{f' (group {group})' if group else ''} by {actor.user}")


def chgrp(catalog: Catalog, directory: Directory, actor: Actor, image_id: int, group: str) -> Image:
    """A new group: MANAGE, and non-administrators only to a group they are in."""
    catalog.get_for(actor, image_id, Right.MANAGE)
    _check_group_exists(directory, group)
    return catalog.transition(image_id, rules.chgrp, actor, group=group, expect=_needs(actor, Right.MANAGE),
                              message=f"group changed to {group} by {actor.user}")


def _check_user_exists(directory: Directory, user: str) -> None:
    if not directory.user_exists(user):
        raise NotFound(f"User {user} does not exist: `hcx-image user list` shows the users.")


def _check_group_exists(directory: Directory, group: str) -> None:
    if not directory.group_exists(group):
        raise NotFound(f"Group {group} does not exist: `hcx-image group list` shows the groups.")


# --- taking an operation up -------------------------------------------------------------------

def claim(catalog: Catalog, image: Image, run_id: str, operation: Operation | None = None) -> Image:
    """`run_id`, a run of `operation`, becomes the one writer of the operation `image` waits on
    (see `rules.claim`)."""
    if image.flow_run_id == run_id:
        return image
    return catalog.transition(image.id, rules.claim, run_id, operation, writer=run_id,
                              message=f"operation taken up by flow run {run_id}")


def register(catalog: Catalog, image: Image, *, message: str, limit_bytes: int | None) -> Image:
    """Insert a new image (LOCKED, owned by its run), counted against `limit_bytes` of its datastore
    under the datastore's accounting lock: concurrent registrations can never overrun it."""
    return catalog.commit(lambda read: [NewImage(image, message, limit_bytes)], writer=image.flow_run_id)[0]


# --- delete -----------------------------------------------------------------------------------

def delete(catalog: Catalog, actor: Actor, image_id: int, *, force: bool = False,
           run_id: str | None = None) -> Image:
    """-> DELETE (the name is free at once); the delete flow then removes the objects and the row.
    Given `run_id` (the delete flow itself), that run owns the delete from this write on."""

    def delete_rule(image: Image):
        changes = rules.delete(image, force=force, is_admin=has_right(actor, image, Right.ADMIN))
        return {**changes, "flow_run_id": run_id} if run_id else changes

    return catalog.transition(image_id, delete_rule, expect=_needs(actor, Right.MANAGE), writer=run_id,
                              message=f"deletion{' (forced)' if force else ''} asked by {actor.user}")


def remove(catalog: Catalog, image_id: int, *, run_id: str | None) -> None:
    """Drop the row of an image whose objects are gone (only from DELETE, only by the run that owns
    the delete). A clone target force-deleted while it held its source lets go of it in the same
    transaction."""

    def plan(read: Reader) -> list[Step]:
        image = read(image_id)
        if image is None or image.state is not ImageState.DELETE:
            return []
        rules.owned_by(image, run_id)
        steps: list[Step] = [Removal(image, "objects removed, row deleted", owner=run_id)]
        source_id = rules.held_clone_source(image)
        if source_id is not None and (source := read(source_id)) is not None:
            steps.append(Move(source, rules.clone_source_release(source),
                              f"clone to image {image_id} ended: the clone was deleted"))
        return steps

    catalog.commit(plan, writer=run_id)


# --- clone ------------------------------------------------------------------------------------

def check_clone(catalog: Catalog, actor: Actor, request: CloneRequest, *, limit_bytes: int | None) -> Image:
    """Refuse a clone that breaks a rule, before anything is written (begin_clone decides again
    atomically); returns the source."""
    source = catalog.get_for(actor, request.source_id, Right.USE)
    rules.clone_source_acquire(source, 0)
    rules.validate_new_image(type_=source.type, persistent=request.persistent)
    rules.validate_name(request.name)
    catalog.check_name_free(actor.user, request.name)
    datastore = request.datastore or source.datastore
    catalog.check_capacity(actor, datastore=datastore, limit_bytes=limit_bytes, required=source.size or 0,
                           skip=request.skip_capacity_check)
    catalog.check_quota(owner=actor.user, group=actor.group, datastore=datastore, required_bytes=source.size or 0)
    return source


def begin_clone(catalog: Catalog, actor: Actor, request: CloneRequest, *, object_id: str,
                limit_bytes: int | None, run_id: str | None) -> Image:
    """The clone target registered LOCKED (owned by `run_id`) and its source taken (CLONING_OPS+1),
    in one transaction: both happen or neither. A run started again for the same object id takes up
    the target it registered, while that still holds its source."""
    existing = catalog.find_by_upload_id(object_id)
    if existing is not None:
        rules.clone_resume(existing)
        return claim(catalog, existing, run_id, Operation.CLONE) if run_id else existing
    limit = rules.capacity_limit(limit_bytes, skip=request.skip_capacity_check, is_admin=actor.is_admin)
    recorded = OperationRecord(op=Operation.CLONE,
                               request=request.model_copy(update={"object_id": object_id}).model_dump(mode="json"))

    def plan(read: Reader) -> list[Step]:
        source = read(request.source_id) or catalog.get(request.source_id)  # get: the NotFound message
        check_access(actor, source, Right.USE)
        target = rules.new_clone(source, actor=actor, name=request.name, datastore=request.datastore,
                                 persistent=request.persistent, description=request.description,
                                 object_id=object_id, run_id=run_id, operation=recorded)
        return [NewImage(target, f"cloning from image {source.id}", limit),
                Move(source, rules.clone_source_acquire(source, NEW_IMAGE_ID), f"clone to image {NEW_IMAGE_MARK} started")]

    return catalog.commit(plan, writer=run_id)[0]


def finish_clone(catalog: Catalog, target_id: int, *, error: str | None, run_id: str | None) -> Image | None:
    """End a clone (`error` None: success) with `rules.finish_clone`: the target unlocked or in
    ERROR and its source released, in one transaction, fenced by the run that owns the target.
    Idempotent: a finished clone is left alone."""

    def plan(read: Reader) -> list[Step]:
        target = read(target_id)
        if target is None:
            return []
        rules.owned_by(target, run_id)
        return _finish_clone_steps(target, read, error, "clone succeeded" if error is None else f"clone failed: {error}",
                                   owner=run_id)

    catalog.commit(plan, writer=run_id)
    return catalog.find(target_id)


def _finish_clone_steps(target: Image, read: Reader, error: str | None, message: str, *,
                        owner: str | None) -> list[Step]:
    source_id = rules.held_clone_source(target)
    source = read(source_id) if source_id is not None else None
    target_changes, source_changes = rules.finish_clone(target, source, error)
    steps: list[Step] = [Move(target, target_changes, message, owner)] if target_changes else []
    if source is not None and source_changes:
        steps.append(Move(source, source_changes, f"clone to image {target.id} ended"))
    return steps


# --- retry and abandon ------------------------------------------------------------------------

def retry(catalog: Catalog, actor: Actor, image_id: int, *, writer: str | None = None) -> Image:
    """ERROR -> back into the failed operation (`rules.retry`), owned by no run until the run that
    carries it on takes it up (`claim`, a history row); a clone target takes its source again in
    the same transaction (unless it never let go of it)."""

    def plan(read: Reader) -> list[Step]:
        image = read(image_id) or catalog.get(image_id)
        check_access(actor, image, Right.MANAGE)
        changes = rules.retry(image)
        op = image.last_operation.op.value
        steps: list[Step] = [Move(image, changes, f"retry of the failed {op} asked by {actor.user}; "
                                                  "waiting for a flow run to take it up")]
        source_id = changes.get("cloning_id")
        if source_id is not None and rules.held_clone_source(image) is None:
            source = read(source_id)
            if source is None:
                raise Refused(f"Cannot retry image {image_id}: image {source_id}, which it was cloned from, "
                              "no longer exists. Delete it.")
            check_access(actor, source, Right.USE)
            steps.append(Move(source, rules.clone_source_acquire(source, image_id),
                              f"clone to image {image_id} started again"))
        return steps

    return catalog.commit(plan, writer=writer)[0]


def abandon(catalog: Catalog, image_id: int, reason: str, *, owner: str | None, writer: str | None) -> list[Image]:
    """The operation the image waits on ended (or its process died) without moving it: what its
    failure would have done (`rules.abandon`), or for a clone target still holding its source
    `rules.finish_clone` on both rows. Fenced by `owner`, the run the image waited on."""

    def plan(read: Reader) -> list[Step]:
        image = read(image_id)
        if image is None:
            return []
        rules.owned_by(image, owner)
        if rules.held_clone_source(image) is not None and image.state in rules.LOCKED_STATES:
            return _finish_clone_steps(image, read, reason, f"abandoned: {reason}", owner=owner)
        return [Move(image, rules.abandon(image, reason), f"abandoned: {reason}", owner)]

    return [i for i in catalog.commit(plan, writer=writer) if i is not None]
