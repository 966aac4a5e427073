"""Users, groups, API tokens, quotas and datastores. Changing any of them is for administrators;
a user may read their own quotas and the datastores (never a secret)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from pydantic import Field, SecretStr

from api.auth import Admin, Caller
from api.shapes import Strict
from blocks.datastore import DATASTORE_NAME, S3Datastore, all_datastores, forget_loaded, load_datastore
from catalog.identity import open_directory
from catalog.model import PermissionDenied, QuotaSubject, Refused, SubjectKind, parse_size
from catalog.quotas import quota_report, set_quota
from catalog.store import open_catalog

router = APIRouter(prefix="/api/v1", tags=["administration"])

Name = Field(min_length=1, max_length=64, pattern=r"^[a-z_][a-z0-9_.-]*$")


class NewUser(Strict):
    name: str = Name
    groups: list[str] = Field(default_factory=list, max_length=64, description="The first is the primary group")
    admin: bool = Field(default=False, description="Also a member of the admin group")


class NewGroup(Strict):
    name: str = Name


@router.get("/whoami", summary="Who this token is")
def whoami(actor: Caller) -> dict:
    return {"name": actor.user, "group": actor.group, "groups": sorted(actor.groups), "admin": actor.is_admin}


@router.get("/users", summary="Every user (administrators)")
def list_users(actor: Admin) -> list[dict]:
    return [user.to_dict() for user in open_directory().list_users()]


@router.post("/users", status_code=201, summary="Add a user; its token is shown once (administrators)")
def add_user(body: NewUser, actor: Admin) -> dict:
    user, token = open_directory().add_user(body.name, body.groups, admin=body.admin)
    return {**user.to_dict(), "token": token}


@router.post("/users/{name}/tokens", status_code=201, summary="A new token for a user, shown once (administrators)")
def issue_token(name: str, actor: Admin) -> dict:
    return {"name": name, "token": open_directory().issue_token(name)}


@router.delete("/users/{name}/tokens", summary="Revoke every token of a user (administrators)")
def revoke_tokens(name: str, actor: Admin) -> dict:
    return {"name": name, "revoked": open_directory().revoke(name)}


@router.get("/groups", summary="Every group and its members (administrators)")
def list_groups(actor: Admin) -> list[dict]:
    return open_directory().list_groups()


@router.post("/groups", status_code=201, summary="Add a group (administrators)")
def add_group(body: NewGroup, actor: Admin) -> dict:
    open_directory().add_group(body.name)
    return {"name": body.name, "members": []}


# --- quotas -----------------------------------------------------------------------------------

class Quota(Strict):
    user: str | None = Field(default=None, min_length=1, max_length=64)
    group: str | None = Field(default=None, min_length=1, max_length=64)
    datastore: str | None = Field(default=None, max_length=128, description="Default: all datastores together")
    images: int | None = Field(default=None, ge=0, le=10**9, description="Most images; none: no limit")
    size: str | None = Field(default=None, max_length=32, description="Most bytes, e.g. 100G; none: no limit")


def _subject(user: str | None, group: str | None) -> QuotaSubject:
    if (user is None) == (group is None):
        raise Refused("Name exactly one of user or group (--user U or --group G).")
    return QuotaSubject(SubjectKind.USER, user) if user is not None else QuotaSubject(SubjectKind.GROUP, group)


@router.put("/quotas", summary="Set a user's or a group's quota (administrators)")
def put_quota(body: Quota, actor: Admin) -> list[dict]:
    subject = _subject(body.user, body.group)
    if body.datastore is not None:
        load_datastore(body.datastore)  # a quota on a datastore that does not exist is a typo
    set_quota(open_catalog(), open_directory(), subject, datastore=body.datastore, max_images=body.images,
              max_bytes=parse_size(body.size) if body.size is not None else None)
    return quota_report(open_catalog(), subject)


@router.get("/quotas", summary="Quotas and use: your own, or (administrators) anyone's")
def get_quotas(actor: Caller, user: str | None = Query(None, max_length=64),
               group: str | None = Query(None, max_length=64)) -> list[dict]:
    subject = QuotaSubject(SubjectKind.USER, actor.user) if user is None and group is None else _subject(user, group)
    own = subject.name == actor.user if subject.kind is SubjectKind.USER else subject.name in actor.groups
    if not (actor.is_admin or own):
        raise PermissionDenied(f"User {actor.user} may only read their own quotas and their groups': ask an "
                               "administrator.")
    return quota_report(open_catalog(), subject)


# --- datastores -------------------------------------------------------------------------------

class NewDatastore(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=f"^{DATASTORE_NAME.pattern}$")
    endpoint: str = Field(min_length=1, max_length=1024, pattern=r"^https?://")
    bucket: str = Field(min_length=3, max_length=63)
    access_key: str = Field(min_length=1, max_length=256)
    secret_key: SecretStr = Field(min_length=1, max_length=1024)
    prefix: str = Field(default="", max_length=512)
    region: str = Field(default="us-east-1", max_length=64)
    kind: Literal["image", "system"] = "image"
    limit: str | None = Field(default=None, max_length=32, description="Capacity, e.g. 500G")
    staging_bucket: str | None = Field(default=None, min_length=3, max_length=63)
    verify_tls: bool = True


def _row(name: str, store: S3Datastore) -> dict:
    return {"name": name, "kind": store.kind, "endpoint": store.endpoint_url, "bucket": store.bucket,
            "prefix": store.prefix, "region": store.region, "used": open_catalog().used_bytes(name),
            "limit": store.limit_bytes, "staging_bucket": store.staging_bucket or store.bucket}


@router.get("/datastores", summary="The datastores and their use (never their secrets)")
def list_datastores(actor: Caller) -> list[dict]:
    return [_row(name, store) for name, store in sorted(all_datastores().items())]


@router.post("/datastores", status_code=201, summary="Register a datastore on any S3 endpoint (administrators)")
def add_datastore(body: NewDatastore, actor: Admin) -> dict:
    if body.name in all_datastores():
        raise Refused(f"Datastore {body.name!r} already exists: choose another name.")
    store = S3Datastore(
        endpoint_url=body.endpoint, bucket=body.bucket, prefix=body.prefix, region=body.region,
        access_key=body.access_key, secret_key=body.secret_key.get_secret_value(), kind=body.kind,
        limit_bytes=parse_size(body.limit) if body.limit else None, staging_bucket=body.staging_bucket,
        verify_tls=body.verify_tls,
    )
    store.ensure_buckets()  # proves the endpoint and the credentials before anything is saved
    store.save(body.name)
    forget_loaded(body.name)
    return _row(body.name, store)
