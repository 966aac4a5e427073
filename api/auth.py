"""Who is asking: only the bearer token says, checked against the hashes the catalog keeps."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from catalog.identity import open_directory
from catalog.permissions import Actor

_bearer = HTTPBearer(auto_error=False, description="An API token: `hcx-image user token NAME` prints one.")

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def authenticated(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Actor:
    if credentials is None:
        raise HTTPException(401, "No API token: send `Authorization: Bearer <token>` (the CLI reads $HCX_TOKEN, "
                                 "or the token file under $HCX_HOME that `hcx-image up` writes).", _CHALLENGE)
    actor = open_directory().authenticate(credentials.credentials)
    if actor is None:
        raise HTTPException(401, "The API token is unknown or revoked: ask an administrator for a new one "
                                 "(`hcx-image user token NAME`).", _CHALLENGE)
    return actor


def administrator(actor: Annotated[Actor, Depends(authenticated)]) -> Actor:
    if not actor.is_admin:
        raise HTTPException(403, f"User {actor.user} is not an administrator: only members of the admin group "
                                 "may do this.")
    return actor


Caller = Annotated[Actor, Depends(authenticated)]
Admin = Annotated[Actor, Depends(administrator)]
