"""Users, groups and API tokens in the catalog's own database (SQLite and PostgreSQL): tokens shown
once and stored only as their sha256, revocable; names checked; the groups and the administrator
that always exist; a flow's actor read from the directory, never from a request field.
Catalog level: no Prefect, no S3."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from catalog.identity import ADMIN_USER, Directory, open_directory, token_rows
from catalog.model import NotFound, Refused
from catalog.requests import RequestedBy
from catalog.store import Catalog


@pytest.fixture
def directory(fresh_catalog) -> Directory:
    return Directory(fresh_catalog.engine)


def directory_rows(directory: Directory) -> tuple:
    """Everything a refusal must leave as it was."""
    return directory.list_users(), directory.list_groups()


def test_the_admin_group_the_users_group_and_the_administrator_always_exist(directory):
    assert {g["name"] for g in directory.list_groups()} == {"users", "oneadmin"}
    admin = directory.actor(ADMIN_USER)
    assert (admin.user, admin.group, admin.is_admin) == ("oneadmin", "oneadmin", True)
    assert directory.get_user(ADMIN_USER).tokens == 0  # it acts for operators; nobody holds a token yet


def test_a_second_directory_on_the_same_database_changes_nothing(fresh_catalog, directory):
    directory.add_group("staff")
    again = Directory(fresh_catalog.engine)
    assert [g["name"] for g in again.list_groups()] == ["oneadmin", "staff", "users"]
    assert [u.name for u in again.list_users()] == ["oneadmin"]


def test_the_directory_lives_in_the_catalogs_database(fresh_catalog, directory):
    directory.add_user("alice")
    tables = set(sa.inspect(fresh_catalog.engine).get_table_names())
    assert {"images", "users", "groups", "memberships", "api_tokens"} <= tables


def test_a_new_user_gets_the_users_group_and_a_token(directory):
    user, token = directory.add_user("alice")
    assert (user.name, user.group, user.groups, user.is_admin, user.tokens) == ("alice", "users", ("users",), False, 1)
    assert token.startswith("hcx_") and len(token) > 40
    actor = directory.authenticate(token)
    assert (actor.user, actor.group, actor.groups, actor.is_admin) == ("alice", "users", frozenset({"users"}), False)


def test_groups_the_first_is_primary_and_admin_adds_the_admin_group(directory):
    directory.add_group("staff")
    directory.add_group("dev")
    user, _ = directory.add_user("bob", groups=["staff", "dev"], admin=True)
    assert (user.group, user.groups, user.is_admin) == ("staff", ("dev", "oneadmin", "staff"), True)
    assert directory.actor("bob").groups == frozenset({"staff", "dev", "oneadmin"})
    members = {g["name"]: g["members"] for g in directory.list_groups()}
    assert members["staff"] == ["bob"] and members["oneadmin"] == ["bob", "oneadmin"]


def test_a_user_in_an_unknown_group_is_refused_and_nothing_is_written(directory):
    before = directory_rows(directory)
    with pytest.raises(Refused, match="Group ghosts does not exist: `hcx-image group add ghosts` first."):
        directory.add_user("carol", groups=["ghosts"])
    assert directory_rows(directory) == before
    assert not directory.user_exists("carol")


def test_existing_names_are_refused(directory):
    directory.add_user("alice")
    with pytest.raises(Refused, match="User alice already exists: `hcx-image user token alice`"):
        directory.add_user("alice")
    with pytest.raises(Refused, match="Group users already exists"):
        directory.add_group("users")
    assert directory.get_user("alice").tokens == 1


@pytest.mark.parametrize("name", ["", "Alice", "al ice", "-dash", "9lives", "x" * 65, "alice\n", "al\x1bice",
                                  "ali\u202ece", "root;drop"])
def test_bad_user_and_group_names_are_refused(directory, name):
    before = directory_rows(directory)
    with pytest.raises(Refused, match="Invalid user name"):
        directory.add_user(name)
    with pytest.raises(Refused, match="Invalid group name"):
        directory.add_group(name)
    assert directory_rows(directory) == before


def test_good_names(directory):
    directory.add_group("team_1.ops-x")
    directory.add_user("_svc", groups=["team_1.ops-x"])
    directory.add_user("a" * 64)
    assert directory.actor("_svc").group == "team_1.ops-x"


def test_only_the_tokens_hash_is_stored(fresh_catalog, directory):
    _, token = directory.add_user("alice")
    with fresh_catalog.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(token_rows))]
    assert [r["sha256"] for r in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in repr(rows)
    assert token not in repr(directory.list_users()) and token not in repr(directory.get_user("alice").to_dict())


def test_a_new_token_leaves_the_old_one_valid_until_revoked(directory):
    _, first = directory.add_user("alice")
    second = directory.issue_token("alice")
    assert first != second
    assert directory.authenticate(first).user == directory.authenticate(second).user == "alice"
    assert directory.get_user("alice").tokens == 2
    assert directory.revoke("alice") == 2
    assert directory.authenticate(first) is None and directory.authenticate(second) is None
    assert directory.get_user("alice").tokens == 0
    assert directory.revoke("alice") == 0
    third = directory.issue_token("alice")  # a revoked user may be given a token again
    assert directory.authenticate(third).user == "alice"


def test_revoking_one_user_leaves_the_others(directory):
    _, alice = directory.add_user("alice")
    _, bob = directory.add_user("bob")
    directory.revoke("alice")
    assert directory.authenticate(alice) is None
    assert directory.authenticate(bob).user == "bob"


@pytest.mark.parametrize("token", ["", "hcx_", "hcx_not-a-token", "Bearer x", "x" * 5000])
def test_unknown_tokens_authenticate_nobody(directory, token):
    directory.add_user("alice")
    assert directory.authenticate(token) is None


def test_a_token_is_not_its_hash(directory):
    """Someone who read the stored hash cannot log in with it."""
    _, token = directory.add_user("alice")
    assert directory.authenticate("hcx_" + hashlib.sha256(token.encode()).hexdigest()) is None
    assert directory.authenticate(hashlib.sha256(token.encode()).hexdigest()) is None


def test_tokens_and_actors_of_missing_users(directory):
    for call in (directory.actor, directory.issue_token, directory.revoke, directory.get_user):
        with pytest.raises(NotFound, match="User ghost does not exist: `hcx-image user list` shows the users."):
            call("ghost")


def test_ensure_user_is_idempotent_and_keeps_an_existing_user(directory):
    directory.add_group("staff")
    first = directory.ensure_user("svc", groups=["staff"])
    again = directory.ensure_user("svc", admin=True)  # already there: left as it is
    assert first == again and (again.group, again.groups, again.is_admin) == ("staff", ("staff",), False)
    assert again.tokens == 0


def test_group_membership_comes_from_the_directory_only(directory):
    """An actor's groups and admin right are what the directory says, whatever a request carries."""
    directory.add_user("mallory")
    assert directory.actor("mallory").is_admin is False
    assert directory.actor("mallory").groups == frozenset({"users"})


# --- the acting identity of a flow run -------------------------------------------------------------

def test_a_request_acts_as_its_owner_as_the_directory_knows_them():
    """RequestedBy reads the owner's groups from the catalog of these settings; a `group` sent with
    the request (as old clients did) is ignored and grants nothing."""
    directory = open_directory()
    if not directory.user_exists("idtest-eve"):
        directory.add_user("idtest-eve")
    request = RequestedBy.model_validate({"owner": "idtest-eve", "group": "oneadmin"})
    actor = request.actor()
    assert (actor.user, actor.group, actor.is_admin) == ("idtest-eve", "users", False)
    with pytest.raises(NotFound, match="User idtest-nobody does not exist"):
        RequestedBy(owner="idtest-nobody").actor()


def test_a_request_with_no_owner_acts_as_the_administrator():
    """An operator starting a deployment from the Prefect UI (behind its auth string)."""
    actor = RequestedBy().actor()
    assert (actor.user, actor.is_admin) == (ADMIN_USER, True)


def test_open_directory_shares_the_catalogs_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    from catalog.store import open_catalog

    assert open_directory(url).engine is open_catalog(url).engine
    assert open_directory(url) is open_directory(url)
    assert isinstance(open_catalog(url), Catalog)
