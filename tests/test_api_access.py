"""Who may do what, through the image API over real HTTP (not the catalog functions): every
operation x {owner, group member, other user, admin} x the permission bits that matter. Allowed
requests do what they say; refused ones answer 404 exactly as for a missing image (when the caller
may not even use it) or 403 naming the missing right, and change nothing."""

from __future__ import annotations

import re

import pytest

from catalog.model import ImageState

S = ImageState
OWNER, MEMBER, OTHER, ADMIN = "alice", "carol", "bob", "root"  # carol shares alice's group; bob does not
MODES = (0o600, 0o640, 0o660, 0o604, 0o606)


def may(actor: str, mode: int, right: str) -> bool:
    bit = {"USE": 4, "MANAGE": 2}[right]
    if actor in (OWNER, ADMIN):
        return True
    bits = mode & 0o7  # "other" applies to everyone, as in the reference; the group bits add to them
    if actor == MEMBER:
        bits |= (mode >> 3) & 0o7
    return bool(bits & bit)


# (verb, method, path, body, right, what an allowed request changed)
OPERATIONS = [
    ("show", "GET", "/images/{id}", None, "USE", lambda before, after: after == before),
    ("history", "GET", "/images/{id}/history", None, "USE", lambda before, after: after == before),
    ("disable", "POST", "/images/{id}/disable", None, "MANAGE", lambda b, a: a.state is S.DISABLED),
    ("rename", "POST", "/images/{id}/rename", {"name": "renamed-{id}"}, "MANAGE",
     lambda b, a: a.name == f"renamed-{a.id}"),
    ("update", "POST", "/images/{id}/update", {"description": "new words"}, "MANAGE",
     lambda b, a: a.description == "new words"),
    ("chtype", "POST", "/images/{id}/chtype", {"type": "DATABLOCK"}, "MANAGE", lambda b, a: a.type.value == "DATABLOCK"),
    ("persistent", "POST", "/images/{id}/persistent", None, "MANAGE", lambda b, a: a.persistent),
    ("chmod", "POST", "/images/{id}/chmod", {"mode": "666"}, "MANAGE", lambda b, a: a.permissions == 0o666),
    ("clone", "POST", "/images/{id}/clone", {"name": "copy"}, "USE", None),  # allowed: a flow, tested elsewhere
    ("delete", "DELETE", "/images/{id}", None, "MANAGE", None),
    ("export", "GET", "/images/{id}/content", None, "USE", None),
]


def missing_answer(client) -> tuple[int, str]:
    reply = client.get("/images/2147483000")
    return reply.status_code, reply.json()["detail"].replace("2147483000", "{id}")


# Every case but an allowed operation that starts a flow (clone, delete, export: their own tests).
CASES = [pytest.param(operation, actor, mode, id=f"{operation[0]}-{actor}-{mode:03o}")
         for operation in OPERATIONS for actor in (OWNER, MEMBER, OTHER, ADMIN) for mode in MODES
         if operation[5] is not None or not may(actor, mode, operation[4])]


@pytest.mark.parametrize("operation, actor, mode", CASES)
def test_permission_matrix(api_as, catalog, put_image, operation, actor, mode):
    verb, method, path, body, right, changed = operation
    image = put_image(S.READY, permissions=mode)
    client = api_as(actor)
    before = (catalog.get(image.id), catalog.history(image.id))
    allowed = may(actor, mode, right)
    body = {k: v.format(id=image.id) if isinstance(v, str) else v for k, v in body.items()} if body else None
    reply = client.request(method, path.format(id=image.id), json=body)
    if allowed:
        assert reply.status_code == 200, reply.text
        assert changed(before[0], catalog.get(image.id)), reply.text
        return
    detail = reply.json()["detail"]
    if not may(actor, mode, "USE"):  # invisible: exactly what a missing image answers
        assert (reply.status_code, detail.replace(str(image.id), "{id}")) == missing_answer(client)
    else:
        assert reply.status_code == 403, reply.text
        assert f"no {right} right on image {image.id}" in detail
    assert not re.search(rf"\b(alice|users|{mode:03o})\b", detail), detail  # no owner, group or bits
    assert (catalog.get(image.id), catalog.history(image.id)) == before


def test_list_shows_exactly_what_each_user_may_use(api_as, put_image):
    images = {mode: put_image(S.READY, permissions=mode).id for mode in MODES}
    for actor in (OWNER, MEMBER, OTHER, ADMIN):
        seen = {i["id"] for i in api_as(actor).get("/images").raise_for_status().json()}
        expected = {image_id for mode, image_id in images.items() if may(actor, mode, "USE")}
        assert seen & set(images.values()) == expected, actor
    mine = {i["id"] for i in api_as(MEMBER).get("/images", params={"mine": "true"}).json()}
    assert not mine & set(images.values())  # carol sees some of alice's images, owns none


def test_admin_bits_need_the_admin_right(api_as, catalog, put_image):
    image = put_image(S.READY, permissions=0o600)
    before = (catalog.get(image.id), catalog.history(image.id))
    reply = api_as(OWNER).post(f"/images/{image.id}/chmod", json={"mode": "700"})
    assert reply.status_code == 403 and "ADMIN" in reply.json()["detail"], reply.text
    assert (catalog.get(image.id), catalog.history(image.id)) == before
    assert api_as(ADMIN).post(f"/images/{image.id}/chmod", json={"mode": "700"}).status_code == 200
    assert catalog.get(image.id).permissions == 0o700


def test_chown_and_chgrp(api_as, catalog, put_image):
    image = put_image(S.READY, permissions=0o600)
    before = (catalog.get(image.id), catalog.history(image.id))
    given_away = api_as(OWNER).post(f"/images/{image.id}/chown", json={"user": OTHER})
    assert given_away.status_code == 403, given_away.text
    foreign_group = api_as(OWNER).post(f"/images/{image.id}/chgrp", json={"group": "staff"})
    assert foreign_group.status_code == 403, foreign_group.text
    assert (catalog.get(image.id), catalog.history(image.id)) == before
    assert api_as(ADMIN).post(f"/images/{image.id}/chown", json={"user": OTHER, "group": "staff"}).status_code == 200
    moved = catalog.get(image.id)
    assert (moved.owner, moved.group) == (OTHER, "staff")
    assert api_as(OWNER).get(f"/images/{image.id}").status_code == 404  # no longer alice's, and 600


def test_tokens_are_the_only_identity(image_api, api_as, tokens):
    import httpx

    assert httpx.get(f"{image_api}/api/v1/images").status_code == 401
    bad = httpx.get(f"{image_api}/api/v1/images", headers={"Authorization": "Bearer hcx_not-a-token"})
    assert bad.status_code == 401 and "unknown or revoked" in bad.json()["detail"]
    who = api_as(MEMBER).get("/whoami", headers={"X-User": "root", "X-Group": "oneadmin"}).json()
    assert (who["name"], who["admin"]) == (MEMBER, False)


def test_request_fields_naming_an_owner_or_an_object_are_refused(api_as, catalog, put_image):
    victim = put_image(S.READY, permissions=0o604)
    before = (catalog.list(), catalog.history(victim.id))
    client = api_as(OTHER)
    for path, body in (
        ("/images", {"name": "x", "size": "1M", "owner": OWNER}),
        ("/images", {"name": "x", "size": "1M", "object_id": victim.upload_id}),
        (f"/images/{victim.id}/clone", {"name": "x", "object_id": victim.upload_id}),
        (f"/images/{victim.id}/clone", {"name": "x", "owner": ADMIN, "group": "oneadmin"}),
    ):
        reply = client.post(path, json=body)
        assert reply.status_code == 422, (path, body, reply.text)
        assert "Extra inputs are not permitted" in reply.json()["detail"]
    assert (catalog.list(), catalog.history(victim.id)) == before


def test_cli_verbs_load_neither_prefect_nor_boto3(image_api, tokens, put_image):
    """The CLI is a client of the image API: a verb (here `list` and `show`) imports no Prefect, no
    boto3 and no database driver in the CLI process; only `up`, `down` and `platform` do."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    image = put_image(S.READY, permissions=0o600)
    code = (
        "import json, sys\nfrom cli.main import app\n"
        "for argv in (['list', '--json'], ['show', sys.argv[1], '--json']):\n"
        "    try:\n        app(argv)\n    except SystemExit as end:\n        assert not end.code, end.code\n"
        "print(json.dumps(sorted(m for m in ('prefect', 'boto3', 'botocore', 'sqlalchemy', 'fastapi') if m in sys.modules)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HCX_"))}
    env.update(HCX_API_URL=image_api, HCX_TOKEN=tokens[OWNER])
    done = subprocess.run([sys.executable, "-c", code, str(image.id)], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'"id": {image.id}' in done.stdout  # the verbs really ran, against the service
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_another_users_upload_id_in_any_parameter_touches_nothing_of_theirs(api_as, catalog, ready_image):
    """bob names alice's upload id as upload_id, object_id and owner in an upload's query: the
    server makes its own ids and acts as bob, so his zeros land in an image of his own, and
    alice's object, its ETag and recorded sha256 stay as they were."""
    import time

    from blocks.datastore import ObjectRef, load_datastore

    victim = ready_image()
    store = load_datastore(victim.datastore)
    etag_before = store.head(ObjectRef.parse(victim.datastore, victim.source)).etag
    client = api_as(OTHER)
    params = {"name": "zeros", "type": "DATABLOCK", "driver": "raw", "upload_id": victim.upload_id,
              "object_id": victim.upload_id, "owner": OWNER, "group": "users"}
    reply = client.post("/images/upload", params=params, content=bytes(victim.size),
                        headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 202, reply.text
    run_id = reply.json()["flow_run_id"]
    deadline = time.monotonic() + 120
    while (run := client.get(f"/runs/{run_id}").json())["image"] is None or run["image"]["state"] == "LOCKED":
        assert time.monotonic() < deadline, run
        time.sleep(0.3)
    made = catalog.get(run["image"]["id"])
    assert (made.state, made.owner, made.group) == (S.READY, OTHER, "staff")
    assert made.upload_id != victim.upload_id and made.source != victim.source
    after = catalog.get(victim.id)
    assert (after.sha256, after.source, after.source_etag) == (victim.sha256, victim.source, victim.source_etag)
    assert store.head(ObjectRef.parse(victim.datastore, victim.source)).etag == etag_before
    assert client.post(f"/images/{victim.id}/retry").status_code == 404  # not even visible to bob
