"""Who may do what: owner/group/other x USE/MANAGE/ADMIN bits, octal like Unix (600 = owner use+manage)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from catalog.model import Image, PermissionDenied, missing_image

DEFAULT_UMASK = 0o177  # new images are 600
ADMIN_BITS = 0o111  # the ADMIN right of owner, group and other


class Right(enum.IntEnum):
    USE = 4
    MANAGE = 2
    ADMIN = 1


@dataclass(frozen=True)
class Actor:
    """Who asks, as the directory knows them (never as a request says): the user, their primary
    group (new images get it), every group they are in, and whether the admin group is one."""

    user: str
    group: str
    groups: frozenset[str] = field(default_factory=frozenset)
    is_admin: bool = False

    def __post_init__(self) -> None:  # the primary group is always one of the user's groups
        object.__setattr__(self, "groups", frozenset(self.groups) | {self.group})


def has_right(actor: Actor, image: Image, right: Right) -> bool:
    if actor.is_admin:
        return True
    bits = image.permissions & 0o007  # other
    if image.group in actor.groups:
        bits |= (image.permissions >> 3) & 0o7
    if actor.user == image.owner:
        bits |= (image.permissions >> 6) & 0o7
    return bool(bits & right)


def require(actor: Actor, image: Image, right: Right) -> None:
    """Refuse unless `actor` has `right` on `image`. The message names the right and the image,
    never the owner, group or bits: they are the image owner's business."""
    if not has_right(actor, image, right):
        raise PermissionDenied(
            f"User {actor.user} has no {right.name} right on image {image.id}: "
            f"ask its owner or an administrator for the {right.name} right, or use an image of your own."
        )


def check_access(actor: Actor, image: Image, right: Right) -> None:
    """`require`, except that an image the actor may not even USE is reported exactly as a missing
    one: whether it exists is its owner's business."""
    if not has_right(actor, image, Right.USE):
        raise missing_image(image.id)
    require(actor, image, right)
