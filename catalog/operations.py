"""The lifecycle operations users ask for, each a thin layer over the catalog: check the right the
operation needs (USE for a clone source, MANAGE for the rest, ADMIN to force-delete a LOCKED
image), then let the rule of `catalog.rules` decide inside `Catalog.transition`, so a permission
or a rule is judged on the same fresh row the compare-and-set writes.

The flows and the CLI call these; none of them decides a rule itself.
"""

from __future__ import annotations

from typing import Callable

from catalog import rules
from catalog.model import Image, ImageType, Operation, Refused
from catalog.permissions import Actor, Right, has_right, require
from catalog.requests import CloneRequest
from catalog.store import Catalog, Move


def _needs(actor: Actor, right: Right) -> Callable[[Image], None]:
    return lambda image: require(actor, image, right)


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


def delete(catalog: Catalog, actor: Actor, image_id: int, *, force: bool = False,
           flow_run_id: str | None = None) -> Image:
    """-> DELETE (the name is free at once); the delete flow then removes the objects and the row."""

    def delete_rule(image: Image) -> dict:
        return rules.delete(image, force=force, is_admin=has_right(actor, image, Right.ADMIN))

    return catalog.transition(image_id, delete_rule, expect=_needs(actor, Right.MANAGE), flow_run_id=flow_run_id,
                              message=f"deletion{' (forced)' if force else ''} asked by {actor.user}")


def check_clone(catalog: Catalog, actor: Actor, request: CloneRequest, *, limit_bytes: int | None) -> Image:
    """Refuse a clone that breaks a rule, before anything is written (begin_clone decides again
    atomically); returns the source."""
    source = catalog.get_for(actor, request.source_id, Right.USE)
    rules.clone_source_acquire(source, 0)
    if not source.source or not source.source_etag:
        raise Refused(f"Image {source.id} records no object to clone from (it was never copied into its datastore).")
    rules.clone_target(source, persistent=request.persistent, description=request.description)
    rules.validate_name(request.name)
    catalog.check_name_free(actor.user, request.name)
    catalog.check_capacity(actor, datastore=request.datastore or source.datastore, limit_bytes=limit_bytes,
                           required=source.size or 0, skip=request.skip_capacity_check)
    return source


def begin_clone(catalog: Catalog, actor: Actor, request: CloneRequest, *, object_id: str,
                limit_bytes: int | None, flow_run_id: str | None) -> Image:
    """The clone target registered LOCKED and its source taken, in one transaction."""
    limit = rules.capacity_limit(limit_bytes, skip=request.skip_capacity_check, is_admin=actor.is_admin)
    recorded = request.model_copy(update={"object_id": object_id}).model_dump(mode="json")
    return catalog.begin_clone(
        actor=actor, source_id=request.source_id, name=request.name, datastore=request.datastore,
        persistent=request.persistent, description=request.description, object_id=object_id,
        flow_run_id=flow_run_id, limit_bytes=limit,
        last_operation={"op": Operation.CLONE.value, "request": recorded},
    )


def retry(catalog: Catalog, actor: Actor, image_id: int, *, flow_run_id: str | None = None) -> Image:
    """ERROR -> back into the failed operation (`rules.retry`); a clone target takes its source
    again in the same transaction (unless it never let go of it)."""

    def plan(read: Callable[[int], Image | None]) -> list[Move]:
        image = catalog.get(image_id)
        require(actor, image, Right.MANAGE)
        changes = rules.retry(image)
        op = image.last_operation["op"]
        moves = [Move(image, changes, f"retry of the failed {op} asked by {actor.user}")]
        source_id = changes.get("cloning_id")
        if source_id is not None and rules.held_clone_source(image) is None:
            source = read(source_id)
            if source is None:
                raise Refused(f"Cannot retry image {image_id}: image {source_id}, which it was cloned from, "
                              "no longer exists. Delete it.")
            require(actor, source, Right.USE)
            moves.append(Move(source, rules.clone_source_acquire(source, image_id),
                              f"clone to image {image_id} started again"))
        return moves

    return catalog.transition_all(plan, flow_run_id=flow_run_id)[0]
