"""Who may do what: owner/group/other x USE/MANAGE/ADMIN bits, octal like Unix (600 = owner use+manage)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from catalog.model import Image, PermissionDenied

DEFAULT_UMASK = 0o177  # new images are 600


class Right(enum.IntEnum):
    USE = 4
    MANAGE = 2
    ADMIN = 1


@dataclass(frozen=True)
class Actor:
    user: str
    group: str
    is_admin: bool = False


def has_right(actor: Actor, image: Image, right: Right) -> bool:
    if actor.is_admin:
        return True
    bits = image.permissions & 0o007  # other
    if actor.group == image.group:
        bits |= (image.permissions >> 3) & 0o7
    if actor.user == image.owner:
        bits |= (image.permissions >> 6) & 0o7
    return bool(bits & right)


def require(actor: Actor, image: Image, right: Right) -> None:
    if not has_right(actor, image, right):
        raise PermissionDenied(
            f"User {actor.user} has no {right.name} right on image {image.id} "
            f"(owner {image.owner}, group {image.group}, permissions {image.permissions:03o})."
        )
