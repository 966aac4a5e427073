"""What several routers share: the strict body base, the answer of a started operation, and the
`remote` query parameter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not take (owner, object_id, ...) is an error


class Started(BaseModel):
    """An operation handed to a flow run: follow it at /runs/{flow_run_id}."""

    flow_run_id: str
    image: dict | None = None
    operation: str | None = None
    repeated: bool = False  # the answer of an earlier request with the same idempotency key


Remote = Annotated[bool | None, Query(description="Run the flow on its deployment (a worker) instead of a "
                                                  "process of the service (default: HCX_REMOTE)")]
