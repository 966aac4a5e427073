"""What several routers share: the strict body base, a published checksum's fields, the answer of a
started operation, and the `remote` query parameter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from catalog.model import Refused
from catalog.requests import Checksum


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not take (owner, object_id, ...) is an error


class PublishedChecksum(BaseModel):
    """The checksum a user got with an image (one of three algorithms), checked on its bytes as they arrive."""

    sha256: str | None = Field(default=None, pattern="^[0-9a-fA-F]{64}$", description="Published sha256 to check")
    sha1: str | None = Field(default=None, pattern="^[0-9a-fA-F]{40}$", description="Published sha1 to check")
    md5: str | None = Field(default=None, pattern="^[0-9a-fA-F]{32}$", description="Published md5 to check")

    def checksum(self) -> Checksum | None:
        """The one published checksum given."""
        given = {name: value for name in ("sha256", "sha1", "md5") if (value := getattr(self, name))}
        if len(given) > 1:
            raise Refused(f"Give one checksum, not {len(given)} ({', '.join(sorted(given))}): the strongest you have.")
        return next((Checksum(algorithm=name, value=value) for name, value in given.items()), None)


class Started(BaseModel):
    """An operation handed to a flow run: follow it at /runs/{flow_run_id}."""

    flow_run_id: str
    image: dict | None = None
    operation: str | None = None
    repeated: bool = False  # the answer of an earlier request with the same idempotency key


Remote = Annotated[bool | None, Query(description="Run the flow on its deployment (a worker) instead of a "
                                                  "process of the service (default: HCX_REMOTE)")]
