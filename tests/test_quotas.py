"""Quotas per user and per group (images, bytes; per datastore or all) on SQLite and PostgreSQL:
refused with the quota named and what is left, nothing changed; released once the row goes;
never overrun by concurrent creations (the subject's accounting row is locked while the insert
checks). Catalog level: no Prefect, no S3."""

from __future__ import annotations

import functools

import pytest

from catalog import operations
from catalog.identity import Directory
from catalog.model import ImageState, NotFound, QuotaSubject, Refused, SubjectKind
from catalog.permissions import Actor
from catalog.quotas import all_quotas_report, quota_report, set_quota
from catalog.requests import CloneRequest
from catalog.store import Catalog
from tests.conftest import all_at_once, catalog_snapshot, register_image

HINT = "delete an image or ask an administrator to raise it."
ADMIN = Actor(user="oneadmin", group="oneadmin", is_admin=True)


def user(name: str) -> QuotaSubject:
    return QuotaSubject(SubjectKind.USER, name)


def group(name: str) -> QuotaSubject:
    return QuotaSubject(SubjectKind.GROUP, name)


@pytest.fixture
def directory(fresh_catalog) -> Directory:
    found = Directory(fresh_catalog.engine)
    found.add_group("staff")
    for name in ("alice", "carol"):
        found.add_user(name)
    found.add_user("bob", groups=["staff"])
    return found


@pytest.fixture
def quota(fresh_catalog, directory):
    return functools.partial(set_quota, fresh_catalog, directory)


def actor(directory: Directory, name: str) -> Actor:
    return directory.actor(name)


def refused(catalog: Catalog, action, message: str) -> None:
    before = catalog_snapshot(catalog)
    with pytest.raises(Refused) as caught:
        action()
    assert str(caught.value) == message
    assert catalog_snapshot(catalog) == before


def test_an_image_over_the_users_image_quota_is_refused(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    quota(user("alice"), datastore="default", max_images=2)
    for n in range(2):
        register_image(fresh_catalog, f"a{n}", actor=alice, size=10)
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "a2", actor=alice, size=10),
            f"Quota of user alice on datastore default: at most 2 images, 2 used, 0 left: {HINT}")
    refused(fresh_catalog, lambda: fresh_catalog.check_quota(owner="alice", group="users", datastore="default",
                                                             required_bytes=10),
            f"Quota of user alice on datastore default: at most 2 images, 2 used, 0 left: {HINT}")
    assert register_image(fresh_catalog, "elsewhere", actor=alice, datastore="other").owner == "alice"
    assert register_image(fresh_catalog, "bobs", actor=actor(directory, "bob")).owner == "bob"


def test_an_image_over_the_byte_quota_is_refused_with_what_is_left(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    quota(user("alice"), max_bytes=3000)
    register_image(fresh_catalog, "big", actor=alice, size=2048)
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "more", actor=alice, size=1000),
            "Quota of user alice on all datastores: at most 2.9K (3000 bytes), 2K used, 952B (952 bytes) left, "
            f"and this image needs 1000B (1000 bytes): {HINT}")
    assert register_image(fresh_catalog, "fits", actor=alice, size=952).size == 952


def test_a_quota_on_all_datastores_counts_every_datastore(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    quota(user("alice"), max_images=2)
    quota(user("alice"), datastore="fast", max_images=5)
    register_image(fresh_catalog, "one", actor=alice, datastore="fast")
    register_image(fresh_catalog, "two", actor=alice, datastore="slow")
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "three", actor=alice, datastore="fast"),
            f"Quota of user alice on all datastores: at most 2 images, 2 used, 0 left: {HINT}")


def test_a_group_quota_counts_every_members_images(fresh_catalog, directory, quota):
    quota(group("users"), max_images=2)
    register_image(fresh_catalog, "a", actor=actor(directory, "alice"))
    register_image(fresh_catalog, "c", actor=actor(directory, "carol"))
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "a2", actor=actor(directory, "alice")),
            f"Quota of group users on all datastores: at most 2 images, 2 used, 0 left: {HINT}")
    assert register_image(fresh_catalog, "b", actor=actor(directory, "bob")).group == "staff"


def test_a_quota_is_released_when_the_row_goes(fresh_catalog, directory, quota):
    """A DELETE row still counts (its bytes are still in the datastore); once removed it does not."""
    alice = actor(directory, "alice")
    quota(user("alice"), max_images=1)
    image = register_image(fresh_catalog, "only", actor=alice)
    operations.delete(fresh_catalog, alice, image.id)
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "next", actor=alice),
            f"Quota of user alice on all datastores: at most 1 images, 1 used, 0 left: {HINT}")
    operations.remove(fresh_catalog, image.id, run_id=None)
    assert register_image(fresh_catalog, "next", actor=alice).state is ImageState.READY


def test_a_clone_counts_against_the_quota(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    bob = actor(directory, "bob")
    source = operations.chmod(fresh_catalog, bob, register_image(fresh_catalog, "golden", actor=bob, size=100).id, 0o604)
    quota(user("alice"), max_images=1)
    register_image(fresh_catalog, "mine", actor=alice)
    request = CloneRequest(owner="alice", source_id=source.id, name="copy")
    message = f"Quota of user alice on all datastores: at most 1 images, 1 used, 0 left: {HINT}"
    refused(fresh_catalog, lambda: operations.check_clone(fresh_catalog, alice, request, limit_bytes=None), message)
    refused(fresh_catalog, lambda: operations.begin_clone(fresh_catalog, alice, request, object_id="o1",
                                                          limit_bytes=None, run_id=None), message)
    assert fresh_catalog.get(source.id).cloning_ops == 0


def test_giving_an_image_away_counts_against_the_new_owners_quota(fresh_catalog, directory, quota):
    alice, bob = actor(directory, "alice"), actor(directory, "bob")
    quota(user("bob"), max_images=1)
    quota(group("staff"), max_bytes=100)
    register_image(fresh_catalog, "bobs", actor=bob, size=10)
    image = register_image(fresh_catalog, "gift", actor=alice, size=50)
    refused(fresh_catalog, lambda: operations.chown(fresh_catalog, directory, ADMIN, image.id, "bob"),
            f"Quota of user bob on all datastores: at most 1 images, 1 used, 0 left: {HINT}")
    big = register_image(fresh_catalog, "big", actor=alice, size=95)
    refused(fresh_catalog, lambda: operations.chgrp(fresh_catalog, directory, ADMIN, big.id, "staff"),
            "Quota of group staff on all datastores: at most 100B (100 bytes), 10B used, 90B (90 bytes) left, "
            f"and this image needs 95B (95 bytes): {HINT}")
    assert operations.chgrp(fresh_catalog, directory, ADMIN, image.id, "staff").group == "staff"
    assert operations.chown(fresh_catalog, directory, ADMIN, image.id, "alice").owner == "alice"


def test_quota_report(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    assert quota_report(fresh_catalog, user("alice")) == [
        {"kind": "user", "subject": "alice", "datastore": None,
         "images": {"limit": None, "used": 0, "left": None}, "bytes": {"limit": None, "used": 0, "left": None}}]
    quota(user("alice"), max_images=3, max_bytes=1000)
    quota(user("alice"), datastore="fast", max_bytes=100)
    register_image(fresh_catalog, "a", actor=alice, size=40, datastore="fast")
    register_image(fresh_catalog, "b", actor=alice, size=300, datastore="slow")
    assert quota_report(fresh_catalog, user("alice")) == [
        {"kind": "user", "subject": "alice", "datastore": None,
         "images": {"limit": 3, "used": 2, "left": 1}, "bytes": {"limit": 1000, "used": 340, "left": 660}},
        {"kind": "user", "subject": "alice", "datastore": "fast",
         "images": {"limit": None, "used": 1, "left": None}, "bytes": {"limit": 100, "used": 40, "left": 60}},
    ]
    quota(group("users"), max_images=10)
    assert [(r["kind"], r["subject"], r["datastore"]) for r in all_quotas_report(fresh_catalog)] == [
        ("group", "users", None), ("user", "alice", None), ("user", "alice", "fast")]
    assert quota_report(fresh_catalog, group("users"))[0]["images"] == {"limit": 10, "used": 2, "left": 8}


def test_setting_quotas(fresh_catalog, directory, quota):
    with pytest.raises(NotFound, match="There is no user ghost: `hcx-image user list` shows them."):
        quota(user("ghost"), max_images=1)
    with pytest.raises(NotFound, match="There is no group ghosts: `hcx-image group list`"):
        quota(group("ghosts"), max_images=1)
    with pytest.raises(Refused, match="--images -1 is negative"):
        quota(user("alice"), max_images=-1)
    quota(user("alice"), max_images=1)
    quota(user("alice"), max_images=5)  # replaced, not added
    assert [q.max_images for q in fresh_catalog.quotas_of(user("alice"))] == [5]
    quota(user("alice"))  # no limit at all: dropped
    assert fresh_catalog.quotas_of(user("alice")) == []


def test_a_zero_quota_refuses_everything_and_a_lower_one_keeps_what_is_there(fresh_catalog, directory, quota):
    alice = actor(directory, "alice")
    register_image(fresh_catalog, "kept", actor=alice)
    quota(user("alice"), max_images=0)
    refused(fresh_catalog, lambda: register_image(fresh_catalog, "new", actor=alice),
            f"Quota of user alice on all datastores: at most 0 images, 1 used, 0 left: {HINT}")
    assert [i.name for i in fresh_catalog.list()] == ["kept"]


# --- the race ------------------------------------------------------------------------------------

def _creations_that_pass(catalog: Catalog, owner: Actor, tag: str, *, racers: int, spread: bool) -> int:
    """`racers` creations at once; `spread`: each on its own datastore, so that only the quota's own
    accounting lock (not a datastore's) can keep them apart."""
    def create(n: int):
        return register_image(catalog, f"{tag}-{n}", actor=owner, size=100,
                              datastore=f"ds-{n}" if spread else "default")

    results = all_at_once([functools.partial(create, n) for n in range(racers)])
    for result in results:  # a loser is refused by the quota, never by another error
        assert not isinstance(result, Exception) or str(result).startswith("Quota of "), repr(result)
    return sum(not isinstance(r, Exception) for r in results)


def test_ten_concurrent_creates_against_room_for_three_on_postgresql(pg_catalog):
    """Ten creations race for a user quota with room for three, six rounds (a fresh user each),
    alternately on one datastore (a quota on it) and spread over ten (a quota on all of them):
    exactly three pass every round."""
    directory = Directory(pg_catalog.engine)
    passed = []
    for round_ in range(6):
        name, spread = f"racer{round_}", bool(round_ % 2)
        directory.add_user(name)
        set_quota(pg_catalog, directory, user(name), datastore=None if spread else "default", max_images=3)
        passed.append(_creations_that_pass(pg_catalog, directory.actor(name), name, racers=10, spread=spread))
        assert pg_catalog.usage(user(name)).images == 3
    assert passed == [3] * 6


def test_concurrent_creates_by_several_members_never_overrun_a_group_quota_on_postgresql(pg_catalog):
    """Members of one group race for its room for three (bytes): exactly three pass."""
    directory = Directory(pg_catalog.engine)
    directory.add_group("team")
    members = [directory.actor(directory.add_user(f"m{n}", groups=["team"])[0].name) for n in range(5)]
    set_quota(pg_catalog, directory, group("team"), max_bytes=300)
    for round_ in range(3):
        calls = [functools.partial(register_image, pg_catalog, f"r{round_}-{n}", actor=members[n % 5], size=100,
                                   datastore=f"ds-{n}") for n in range(10)]
        results = all_at_once(calls)
        assert sum(not isinstance(r, Exception) for r in results) == (3 if round_ == 0 else 0)
        assert all(str(r).startswith("Quota of group team") for r in results if isinstance(r, Exception))
    assert pg_catalog.usage(group("team")).bytes == 300


def test_concurrent_creates_never_overrun_a_quota_on_sqlite(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    directory = Directory(catalog.engine)
    directory.add_user("racer")
    set_quota(catalog, directory, user("racer"), max_images=3)
    assert _creations_that_pass(catalog, directory.actor("racer"), "r", racers=10, spread=True) == 3
