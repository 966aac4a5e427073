"""Sharing (image-rules.md "Ownership, sharing, quotas") and the bounds of what users name: chmod,
chown and chgrp with the rights they need; images a user may not see answer as missing ones;
names, descriptions and attributes bounded. Catalog level on SQLite and PostgreSQL: no Prefect,
no S3; every refusal changes nothing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from catalog import operations
from catalog.identity import Directory
from catalog.model import NotFound, PermissionDenied, Refused, missing_image
from catalog.permissions import Actor, Right
from catalog.requests import CloneRequest, CreateEmptyRequest, UploadRequest
from catalog.store import Catalog
from tests.conftest import catalog_snapshot, register_image


@pytest.fixture
def directory(fresh_catalog) -> Directory:
    """alice and carol in "users", bob in "staff", dave in both (primary "staff"), root an admin."""
    found = Directory(fresh_catalog.engine)
    found.add_group("staff")
    found.add_user("alice")
    found.add_user("carol")
    found.add_user("bob", groups=["staff"])
    found.add_user("dave", groups=["staff", "users"])
    found.add_user("root", admin=True)
    return found


@pytest.fixture
def people(directory) -> dict[str, Actor]:
    return {name: directory.actor(name) for name in ("alice", "bob", "carol", "dave", "root")}


@pytest.fixture
def alices_image(fresh_catalog, people):
    return lambda name="disk", **fields: register_image(fresh_catalog, name, actor=people["alice"], **fields)


@pytest.fixture
def refused(fresh_catalog):
    """Run `action`, expect exactly `exc_type` with a message containing `message`, and prove nothing changed."""

    def check(action, message: str, exc_type: type[Exception] = Refused) -> str:
        before = catalog_snapshot(fresh_catalog)
        with pytest.raises(exc_type) as caught:
            action()
        assert message in str(caught.value), str(caught.value)
        assert catalog_snapshot(fresh_catalog) == before
        return str(caught.value)

    return check


def visible_to(catalog: Catalog, actor: Actor) -> set[int]:
    return {i.id for i in catalog.list(actor)}


# --- visibility ----------------------------------------------------------------------------------

def test_new_images_are_private(fresh_catalog, people, alices_image):
    image = alices_image()
    assert (image.owner, image.group, image.permissions) == ("alice", "users", 0o600)
    assert visible_to(fresh_catalog, people["carol"]) == set()
    assert visible_to(fresh_catalog, people["root"]) == {image.id}


def test_an_image_one_may_not_use_answers_exactly_as_a_missing_one(fresh_catalog, people, alices_image):
    image = alices_image()
    missing = 10_000
    with pytest.raises(NotFound) as absent:
        fresh_catalog.get_for(people["bob"], missing, Right.USE)
    for right in Right:
        with pytest.raises(NotFound) as hidden:
            fresh_catalog.get_for(people["bob"], image.id, right)
        assert str(hidden.value) == str(absent.value).replace(str(missing), str(image.id))
        assert str(hidden.value) == str(missing_image(image.id))
        assert "alice" not in str(hidden.value) and "600" not in str(hidden.value)


def test_a_missing_right_is_named_without_owner_group_or_bits(fresh_catalog, people, alices_image):
    image = operations.chmod(fresh_catalog, people["alice"], alices_image().id, 0o604)
    with pytest.raises(PermissionDenied) as caught:
        fresh_catalog.get_for(people["bob"], image.id, Right.MANAGE)
    message = str(caught.value)
    assert message.startswith(f"User bob has no MANAGE right on image {image.id}: ")
    assert not any(word in message for word in ("alice", "users", "604", "permissions"))


def test_every_operation_on_an_invisible_image_answers_as_missing(fresh_catalog, directory, people, alices_image,
                                                                   refused):
    image = alices_image()
    bob = people["bob"]
    for action in (lambda: operations.enable(fresh_catalog, bob, image.id),
                   lambda: operations.rename(fresh_catalog, bob, image.id, "mine"),
                   lambda: operations.delete(fresh_catalog, bob, image.id),
                   lambda: operations.chmod(fresh_catalog, bob, image.id, 0o777),
                   lambda: operations.chown(fresh_catalog, directory, bob, image.id, "bob"),
                   lambda: operations.chgrp(fresh_catalog, directory, bob, image.id, "staff"),
                   lambda: operations.check_clone(fresh_catalog, bob, CloneRequest(owner="bob", source_id=image.id,
                                                                                   name="x"), limit_bytes=None)):
        refused(action, str(missing_image(image.id)), NotFound)


def test_chmod_shares_with_the_group_then_with_everyone(fresh_catalog, people, alices_image):
    """The seed's story: private by default; 640 shares with the group; 604 with everyone."""
    image = alices_image()
    operations.chmod(fresh_catalog, people["alice"], image.id, 0o640)
    assert image.id in visible_to(fresh_catalog, people["carol"]) and image.id in visible_to(fresh_catalog, people["dave"])
    assert image.id not in visible_to(fresh_catalog, people["bob"])
    operations.chmod(fresh_catalog, people["alice"], image.id, 0o604)
    assert all(image.id in visible_to(fresh_catalog, people[p]) for p in ("bob", "carol", "dave"))
    history = fresh_catalog.history(image.id)
    assert [h["message"] for h in history[-2:]] == ["permissions changed to 640 by alice",
                                                    "permissions changed to 604 by alice"]


def test_list_mine_shows_only_ones_own(fresh_catalog, people, alices_image):
    shared = operations.chmod(fresh_catalog, people["alice"], alices_image("shared").id, 0o604)
    own = register_image(fresh_catalog, "own", actor=people["bob"])
    assert [i.id for i in fresh_catalog.list(people["bob"])] == [shared.id, own.id]
    assert [i.id for i in fresh_catalog.list(people["bob"], mine=True)] == [own.id]
    assert [i.id for i in fresh_catalog.list(people["root"], mine=True)] == []


# --- chmod ---------------------------------------------------------------------------------------

def test_chmod_needs_manage(fresh_catalog, people, alices_image, refused):
    image = operations.chmod(fresh_catalog, people["alice"], alices_image().id, 0o644)
    refused(lambda: operations.chmod(fresh_catalog, people["bob"], image.id, 0o666),
            f"User bob has no MANAGE right on image {image.id}", PermissionDenied)
    group_managed = operations.chmod(fresh_catalog, people["alice"], image.id, 0o660)
    assert operations.chmod(fresh_catalog, people["carol"], group_managed.id, 0o640).permissions == 0o640


def test_changing_the_admin_bits_needs_the_admin_right(fresh_catalog, people, alices_image, refused):
    image = alices_image()
    refused(lambda: operations.chmod(fresh_catalog, people["alice"], image.id, 0o700),
            f"Changing the ADMIN bits of image {image.id} (the 1 of each octal digit) needs the ADMIN right on it",
            PermissionDenied)
    assert operations.chmod(fresh_catalog, people["root"], image.id, 0o700).permissions == 0o700
    # alice now has ADMIN on it (owner bit 1): she may change ADMIN bits herself
    assert operations.chmod(fresh_catalog, people["alice"], image.id, 0o641).permissions == 0o641


@pytest.mark.parametrize("mode", [-1, 0o1000, 0o7777])
def test_chmod_refuses_modes_outside_000_777(fresh_catalog, people, alices_image, refused, mode):
    image = alices_image()
    refused(lambda: operations.chmod(fresh_catalog, people["alice"], image.id, mode), "Invalid permissions")


# --- chown and chgrp -------------------------------------------------------------------------------

def test_only_an_admin_gives_an_image_to_another_user(fresh_catalog, directory, people, alices_image,
                                                      refused):
    image = alices_image()
    refused(lambda: operations.chown(fresh_catalog, directory, people["alice"], image.id, "bob"),
            f"Only an administrator may give image {image.id} to another user (bob)", PermissionDenied)
    given = operations.chown(fresh_catalog, directory, people["root"], image.id, "bob")
    assert (given.owner, given.group, given.permissions) == ("bob", "users", 0o600)  # the group stays
    assert image.id not in visible_to(fresh_catalog, people["alice"])
    assert fresh_catalog.history(image.id)[-1]["message"] == "owner changed to bob by root"
    both = operations.chown(fresh_catalog, directory, people["root"], image.id, "alice", "staff")
    assert (both.owner, both.group) == ("alice", "staff")


def test_chown_to_oneself_with_a_group_of_ones_own(fresh_catalog, directory, people, refused):
    image = register_image(fresh_catalog, "d", actor=people["dave"])
    assert operations.chown(fresh_catalog, directory, people["dave"], image.id, "dave", "users").group == "users"
    refused(lambda: operations.chown(fresh_catalog, directory, people["dave"], image.id, "dave", "oneadmin"),
            "User dave is not in group oneadmin", PermissionDenied)


def test_chown_needs_manage(fresh_catalog, directory, people, alices_image, refused):
    image = operations.chmod(fresh_catalog, people["alice"], alices_image().id, 0o604)
    refused(lambda: operations.chown(fresh_catalog, directory, people["bob"], image.id, "bob"),
            f"User bob has no MANAGE right on image {image.id}", PermissionDenied)


def test_chown_to_unknown_users_and_groups(fresh_catalog, directory, people, alices_image, refused):
    image = alices_image()
    refused(lambda: operations.chown(fresh_catalog, directory, people["root"], image.id, "ghost"),
            "User ghost does not exist", NotFound)
    refused(lambda: operations.chown(fresh_catalog, directory, people["root"], image.id, "bob", "ghosts"),
            "Group ghosts does not exist", NotFound)
    refused(lambda: operations.chgrp(fresh_catalog, directory, people["root"], image.id, "ghosts"),
            "Group ghosts does not exist", NotFound)


def test_chown_onto_a_name_the_new_owner_holds_is_refused(fresh_catalog, directory, people, alices_image,
                                                          refused):
    image = alices_image("web")
    bobs = register_image(fresh_catalog, "web", actor=people["bob"])
    refused(lambda: operations.chown(fresh_catalog, directory, people["root"], image.id, "bob"),
            f"NAME is already taken by IMAGE {bobs.id} of user bob: rename image {image.id} (or image {bobs.id}) first.")
    operations.rename(fresh_catalog, people["alice"], image.id, "web-2")
    assert operations.chown(fresh_catalog, directory, people["root"], image.id, "bob").owner == "bob"


def test_chgrp_to_ones_own_groups_only(fresh_catalog, directory, people, refused):
    image = register_image(fresh_catalog, "d", actor=people["dave"])
    assert image.group == "staff"
    assert operations.chgrp(fresh_catalog, directory, people["dave"], image.id, "users").group == "users"
    refused(lambda: operations.chgrp(fresh_catalog, directory, people["dave"], image.id, "oneadmin"),
            "User dave is not in group oneadmin: an image can be given only to one of your own groups",
            PermissionDenied)
    assert operations.chgrp(fresh_catalog, directory, people["root"], image.id, "oneadmin").group == "oneadmin"


def test_chgrp_moves_who_shares_the_image(fresh_catalog, directory, people):
    image = register_image(fresh_catalog, "d", actor=people["dave"])
    operations.chmod(fresh_catalog, people["dave"], image.id, 0o640)
    assert image.id in visible_to(fresh_catalog, people["bob"]) and image.id not in visible_to(fresh_catalog, people["alice"])
    operations.chgrp(fresh_catalog, directory, people["dave"], image.id, "users")
    assert image.id in visible_to(fresh_catalog, people["alice"]) and image.id not in visible_to(fresh_catalog, people["bob"])


def test_a_group_member_with_manage_may_chgrp_only_to_their_groups(fresh_catalog, directory, people,
                                                                   alices_image, refused):
    image = operations.chmod(fresh_catalog, people["alice"], alices_image().id, 0o660)
    refused(lambda: operations.chgrp(fresh_catalog, directory, people["carol"], image.id, "staff"),
            "User carol is not in group staff", PermissionDenied)
    refused(lambda: operations.chown(fresh_catalog, directory, people["carol"], image.id, "carol"),
            "Only an administrator may give image", PermissionDenied)


def test_a_deleting_image_keeps_its_owner(fresh_catalog, directory, people, alices_image, refused):
    image = alices_image()
    operations.delete(fresh_catalog, people["alice"], image.id)
    refused(lambda: operations.chown(fresh_catalog, directory, people["root"], image.id, "bob"),
            "it is in state DELETE")
    refused(lambda: operations.chmod(fresh_catalog, people["alice"], image.id, 0o640), "it is in state DELETE")


# --- bounds --------------------------------------------------------------------------------------

BAD_NAMES = {
    "empty": "",
    "too long": "n" * 129,
    "escape": "evil\x1b[31mred",
    "newline": "two\nlines",
    "carriage return": "over\rwrite",
    "bidi override": "abc\u202etxt.exe",
    "zero width": "zero\u200bwidth",
    "line separator": "line\u2028sep",
    "paragraph separator": "para\u2029sep",
    "nul": "nul\x00",
    "padded": " padded ",
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_names_are_refused_everywhere(fresh_catalog, people, alices_image, refused, name):
    image = alices_image()
    message = refused(lambda: operations.rename(fresh_catalog, people["alice"], image.id, name), "Invalid image name")
    assert not any(c in message for c in "\x1b\n\r\u202e\u200b\u2028\u2029\x00")  # quoted escaped
    refused(lambda: register_image(fresh_catalog, name, actor=people["alice"]), "Invalid image name")
    for model, fields in ((UploadRequest, {}), (CreateEmptyRequest, {"size": 1024}), (CloneRequest, {"source_id": 1})):
        with pytest.raises(ValidationError):
            model(owner="alice", name=name, **fields)


def test_names_up_to_128_characters_of_any_script(fresh_catalog, people, alices_image):
    image = alices_image()
    for name in ("n" * 128, "disque-été ディスク", "a b.c_d-e (1)"):
        assert operations.rename(fresh_catalog, people["alice"], image.id, name).name == name
        assert UploadRequest(owner="alice", name=name).name == name


def test_descriptions_up_to_4_kib(fresh_catalog, people, alices_image, refused):
    image = alices_image()
    assert operations.update(fresh_catalog, people["alice"], image.id, description="d" * 4096).description == "d" * 4096
    assert operations.update(fresh_catalog, people["alice"], image.id, description="é" * 2048).description == "é" * 2048
    for too_long in ("d" * 4097, "é" * 2049):  # counted in bytes (UTF-8)
        refused(lambda: operations.update(fresh_catalog, people["alice"], image.id, description=too_long),
                "at most 4096 bytes (4 KiB)")
        refused(lambda: register_image(fresh_catalog, "long", actor=people["alice"], description=too_long),
                "at most 4096 bytes (4 KiB)")
        with pytest.raises(ValidationError, match="at most 4096 bytes"):
            UploadRequest(owner="alice", name="x", description=too_long)
        with pytest.raises(ValidationError, match="at most 4096 bytes"):
            CloneRequest(owner="alice", name="x", source_id=1, description=too_long)


def test_attributes_are_bounded(fresh_catalog, people, alices_image, refused):
    image = alices_image()
    alice = people["alice"]
    many = {f"k{n}": "v" for n in range(128)}
    assert len(operations.update(fresh_catalog, alice, image.id, set_attributes=many).attributes) == 128
    refused(lambda: operations.update(fresh_catalog, alice, image.id, set_attributes={"one.more": "v"}),
            "An image has at most 128 attributes and this one would have 129: unset some first.")
    updated = operations.update(fresh_catalog, alice, image.id, set_attributes={"one.more": "v"}, unset=["k0"])
    assert len(updated.attributes) == 128


@pytest.mark.parametrize("key, value, message", [
    ("k" * 65, "v", "Invalid attribute name"),
    ("", "v", "Invalid attribute name"),
    ("A=B", "v", "Invalid attribute name"),
    ("sp ace", "v", "Invalid attribute name"),
    ("esc\x1b", "v", "Invalid attribute name"),
    ("ok", "v" * 1025, "its value is 1025 bytes long, at most 1024"),
    ("ok", "é" * 513, "its value is 1026 bytes long, at most 1024"),
])
def test_bad_attributes_are_refused(fresh_catalog, people, alices_image, refused, key, value, message):
    image = alices_image()
    refused(lambda: operations.update(fresh_catalog, people["alice"], image.id, set_attributes={key: value}), message)
    refused(lambda: register_image(fresh_catalog, "attrs", actor=people["alice"], attributes={key: value}), message)


def test_good_attributes(fresh_catalog, people, alices_image):
    image = alices_image()
    attributes = {"k" * 64: "v" * 1024, "A.b-c_9": "", "x": "é" * 512}
    assert operations.update(fresh_catalog, people["alice"], image.id, set_attributes=attributes).attributes == attributes
