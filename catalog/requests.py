"""What a user asks for: typed request models shared by the CLI, the flows and their deployments."""

from __future__ import annotations

from pydantic import BaseModel, Field

from catalog.model import Bus, DiskFormat, ImageType
from catalog.permissions import Actor
from catalog.settings import get_settings


class RequestedBy(BaseModel):
    owner: str = Field(description="User the operation acts as")
    group: str = Field(default="users", description="That user's group")

    def actor(self) -> Actor:
        return actor_for(self.owner, self.group)


class UploadRequest(RequestedBy):
    """Register an image from bytes already staged (by the CLI or an external tool) or a local path."""

    name: str = Field(min_length=1, max_length=255)
    type: ImageType = ImageType.OS
    datastore: str = "default"
    persistent: bool = False
    bus: Bus = Bus.VIRTIO
    driver: DiskFormat | None = Field(default=None, description="raw or qcow2; must match the bytes (None: detected)")
    description: str = ""
    path: str | None = Field(default=None, description="A file on the worker to stage first (server-side read)")
    upload_id: str | None = Field(default=None, description="Id of the staged object; default: the flow run id")
    expected_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")


def actor_for(user: str, group: str) -> Actor:
    return Actor(user=user, group=group, is_admin=get_settings().admin_group in (user, group))
