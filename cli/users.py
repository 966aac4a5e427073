"""`hcx-image user|group|quota ...`: who may use the service and how much (administrators change
them; anyone reads their own quotas)."""

from __future__ import annotations

from typing import Optional

import typer

from catalog.model import human_size
from cli.client import Api
from cli.common import console, literal, print_json, refusals_exit_1, say

users = typer.Typer(help="Users and their API tokens (administrators).", no_args_is_help=True)
groups = typer.Typer(help="Groups (administrators).", no_args_is_help=True)
quotas = typer.Typer(help="Quotas per user and per group.", no_args_is_help=True)


def _said_token(name: str, groups_: list[str], token: str, json_: bool) -> None:
    """The token alone on the last line of stdout (scripts take it with `tail -1`)."""
    if json_:
        print_json({"name": name, "groups": groups_, "token": token})
        return
    say(f"user {name} (groups {', '.join(groups_)}); its API token, shown this once:")
    say(token)


@users.command("add")
@refusals_exit_1
def add_user(name: str,
             group: Optional[list[str]] = typer.Option(None, "--group", help="A group (repeatable; the first is primary)"),
             admin: bool = typer.Option(False, "--admin", help="Also an administrator (the admin group)"),
             json_: bool = typer.Option(False, "--json")) -> None:
    """Add a user; prints its API token (only this once)."""
    user = Api().post("/users", {"name": name, "groups": group or [], "admin": admin})
    _said_token(user["name"], user["groups"], user["token"], json_)


@users.command("list")
@refusals_exit_1
def list_users(json_: bool = typer.Option(False, "--json")) -> None:
    """Every user, their groups and how many live tokens they have (never a token)."""
    rows = Api().get("/users")
    if json_:
        print_json(rows)
        return
    from rich.table import Table  # (only for the verbs that print one)

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "GROUP", "GROUPS", "ADMIN", "TOKENS"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(literal(v) for v in (row["name"], row["group"], ",".join(row["groups"]),
                                              "yes" if row["admin"] else "no", row["tokens"])))
    console.print(table)


@users.command("token")
@refusals_exit_1
def new_token(name: str, json_: bool = typer.Option(False, "--json")) -> None:
    """A new API token for NAME (the old ones stay valid until revoked)."""
    api = Api()
    token = api.post(f"/users/{name}/tokens")["token"]
    user = next((u for u in api.get("/users") if u["name"] == name), {"groups": []})
    _said_token(name, user["groups"], token, json_)


@users.command("revoke")
@refusals_exit_1
def revoke(name: str) -> None:
    """Revoke every API token of NAME at once."""
    revoked = Api().delete(f"/users/{name}/tokens")["revoked"]
    say(f"revoked {revoked} token(s) of user {name}")


@groups.command("add")
@refusals_exit_1
def add_group(name: str) -> None:
    """Add a group."""
    Api().post("/groups", {"name": name})
    say(f"group {name} added")


@groups.command("list")
@refusals_exit_1
def list_groups(json_: bool = typer.Option(False, "--json")) -> None:
    """Every group and its members."""
    rows = Api().get("/groups")
    if json_:
        print_json(rows)
        return
    for row in rows:
        say(row["name"], ": ", ", ".join(row["members"]) or "-")


@quotas.command("set")
@refusals_exit_1
def set_quota(user: Optional[str] = typer.Option(None, "--user"), group: Optional[str] = typer.Option(None, "--group"),
              datastore: Optional[str] = typer.Option(None, "--datastore", help="Default: all datastores together"),
              images: Optional[int] = typer.Option(None, "--images", min=0, help="Most images"),
              size: Optional[str] = typer.Option(None, "--size", help="Most bytes, e.g. 100G")) -> None:
    """Set a user's or a group's quota (administrators); omitted limits are none."""
    if (user is None) == (group is None):
        raise typer.BadParameter("give --user U or --group G (one of them)")
    _print_quotas(Api().put("/quotas", {"user": user, "group": group, "datastore": datastore,
                                        "images": images, "size": size}), json_=False)


@quotas.command("show")
@refusals_exit_1
def show_quota(user: Optional[str] = typer.Option(None, "--user"), group: Optional[str] = typer.Option(None, "--group"),
               json_: bool = typer.Option(False, "--json")) -> None:
    """Quotas and what is used (default: your own)."""
    _print_quotas(Api().get("/quotas", user=user, group=group), json_=json_)


def _print_quotas(rows: list[dict], *, json_: bool) -> None:
    if json_:
        print_json(rows)
        return
    if not rows:
        say("no quota")
        return
    from rich.table import Table  # (only for the verbs that print one)

    table = Table(box=None, header_style="bold")
    for column in ("WHO", "DATASTORE", "IMAGES", "SIZE"):
        table.add_column(column)

    def used_of(count: dict, show=str) -> str:
        return f"{show(count['used'])} used of {show(count['limit']) if count['limit'] is not None else 'no limit'}"

    for row in rows:
        table.add_row(*(literal(v) for v in (
            f"{row['kind']} {row['subject']}", row["datastore"] or "(all)",
            used_of(row["images"]), used_of(row["bytes"], human_size))))
    console.print(table)
