"""Who may call the service: users, groups, memberships and API tokens, kept in the catalog's
database (the same engine and metadata as the image rows).

The caller's identity comes only from a token (`Directory.authenticate`) or, for a flow run the
image API started, from the user it names (`Directory.actor`): groups and administrator rights
are always read here, never taken from a request, a form or the environment.

A token is shown once, when it is issued; only its sha256 is stored. Tokens are 256 random bits,
so a plain hash (no salt, no slow KDF) is enough and lets a token be found by its hash.
The groups "users" and the admin group (`Settings.admin_group`) and the administrator user
`oneadmin` always exist: operators who start a deployment from the Prefect UI act as `oneadmin`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from catalog.model import NotFound, Refused, as_utc, utcnow
from catalog.permissions import Actor
from catalog.settings import get_settings
from catalog.store import dialect_insert, ensure_tables, metadata, open_catalog

ADMIN_USER = "oneadmin"
DEFAULT_GROUP = "users"
TOKEN_PREFIX = "hcx_"
NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")

user_rows = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("primary_group", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

group_rows = sa.Table(
    "groups",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

membership_rows = sa.Table(
    "memberships",
    metadata,
    sa.Column("user", sa.String(64), sa.ForeignKey("users.name"), primary_key=True),
    sa.Column("group", sa.String(64), sa.ForeignKey("groups.name"), primary_key=True),
)

token_rows = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("user", sa.String(64), sa.ForeignKey("users.name"), nullable=False, index=True),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

_TABLES = (user_rows, group_rows, membership_rows, token_rows)


@dataclass(frozen=True)
class User:
    name: str
    group: str  # primary group: the group of the user's new images
    groups: tuple[str, ...]
    is_admin: bool
    tokens: int  # tokens not revoked
    created_at: datetime

    def to_dict(self) -> dict:
        return {"name": self.name, "group": self.group, "groups": list(self.groups), "is_admin": self.is_admin,
                "tokens": self.tokens, "created_at": self.created_at.isoformat()}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def validate_subject_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name[:40]) if isinstance(name, str) else repr(name)
        raise Refused(f"Invalid {kind} name {shown}: use 1-64 lowercase letters, digits, '_', '.' or '-', "
                      "starting with a letter or '_'.")


@lru_cache
def _ensure_tables(engine: sa.Engine) -> sa.Engine:
    """As staging.py: the catalog creates every table of `metadata` it knows when it opens, these
    too when it was opened before this module was imported. Then the groups and the administrator
    that always exist (idempotent, safe when several processes start at once)."""
    ensure_tables(engine, *_TABLES)
    admin_group = get_settings().admin_group
    with engine.begin() as conn:
        for group in (DEFAULT_GROUP, admin_group):
            conn.execute(dialect_insert(conn, group_rows).values(name=group, created_at=utcnow()).on_conflict_do_nothing())
        conn.execute(dialect_insert(conn, user_rows).values(name=ADMIN_USER, primary_group=admin_group, created_at=utcnow())
                     .on_conflict_do_nothing())
        conn.execute(dialect_insert(conn, membership_rows).values(user=ADMIN_USER, group=admin_group).on_conflict_do_nothing())
    return engine


class Directory:
    """The users, groups and tokens of one catalog."""

    def __init__(self, engine: sa.Engine):
        self.engine = _ensure_tables(engine)
        self.admin_group = get_settings().admin_group

    # --- groups ------------------------------------------------------------------------------

    def add_group(self, name: str) -> None:
        validate_subject_name("group", name)
        try:
            with self.engine.begin() as conn:
                conn.execute(group_rows.insert().values(name=name, created_at=utcnow()))
        except SqlIntegrityError:
            raise Refused(f"Group {name} already exists: `hcx-image group list` shows the groups.") from None

    def group_exists(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(group_rows.c.name).where(group_rows.c.name == name)).first() is not None

    def list_groups(self) -> list[dict]:
        with self.engine.connect() as conn:
            names = conn.execute(sa.select(group_rows.c.name).order_by(group_rows.c.name)).scalars().all()
            pairs = conn.execute(sa.select(membership_rows).order_by(membership_rows.c.user)).all()
        return [{"name": name, "members": [p.user for p in pairs if p.group == name]} for name in names]

    # --- users -------------------------------------------------------------------------------

    def add_user(self, name: str, groups: Sequence[str] = (), admin: bool = False) -> tuple[User, str]:
        """A new user and their first token (shown only here). Primary group: the first of
        `groups`, else "users"; `admin`: also a member of the admin group."""
        validate_subject_name("user", name)
        member_of = self._memberships_for(groups, admin)
        token = new_token()
        try:
            with self.engine.begin() as conn:
                conn.execute(user_rows.insert().values(name=name, primary_group=member_of[0], created_at=utcnow()))
                conn.execute(membership_rows.insert(), [{"user": name, "group": g} for g in member_of])
                self._insert_token(conn, name, token)
        except SqlIntegrityError:
            raise Refused(f"User {name} already exists: `hcx-image user token {name}` gives them a new token.") from None
        return self.get_user(name), token

    def ensure_user(self, name: str, groups: Sequence[str] = (), admin: bool = False) -> User:
        """The user, added (with no token) unless they exist; an existing user is left as they are."""
        validate_subject_name("user", name)
        member_of = self._memberships_for(groups, admin)
        with self.engine.begin() as conn:
            added = conn.execute(dialect_insert(conn, user_rows).values(
                name=name, primary_group=member_of[0], created_at=utcnow())
                .on_conflict_do_nothing().returning(user_rows.c.name)).first()
            if added is not None:
                conn.execute(membership_rows.insert(), [{"user": name, "group": g} for g in member_of])
        return self.get_user(name)

    def _memberships_for(self, names: Sequence[str], admin: bool) -> list[str]:
        """The groups of a new user, primary group first; each must exist."""
        member_of = list(dict.fromkeys(names or [DEFAULT_GROUP]))
        if admin and self.admin_group not in member_of:
            member_of.append(self.admin_group)
        for group in member_of:
            validate_subject_name("group", group)
            if not self.group_exists(group):
                raise Refused(f"Group {group} does not exist: `hcx-image group add {group}` first.")
        return member_of

    def user_exists(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(user_rows.c.name).where(user_rows.c.name == name)).first() is not None

    def get_user(self, name: str) -> User:
        found = self._users(user_rows.c.name == name)
        if not found:
            raise NotFound(f"User {name} does not exist: `hcx-image user list` shows the users.")
        return found[0]

    def list_users(self) -> list[User]:
        return self._users()

    def _users(self, *where) -> list[User]:
        live = token_rows.c.revoked_at.is_(None)
        # Memberships and token counts of the chosen users only: every API request reads one user.
        chosen = sa.select(user_rows.c.name).where(*where).scalar_subquery() if where else None
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(user_rows).where(*where).order_by(user_rows.c.name)).all()
            pairs = conn.execute(sa.select(membership_rows).where(
                *([membership_rows.c.user.in_(chosen)] if where else []))).all()
            counts = dict(conn.execute(sa.select(token_rows.c.user, sa.func.count()).where(
                live, *([token_rows.c.user.in_(chosen)] if where else [])).group_by(token_rows.c.user)).all())
        found = []
        for row in rows:
            member_of = tuple(sorted(p.group for p in pairs if p.user == row.name))
            found.append(User(name=row.name, group=row.primary_group, groups=member_of,
                              is_admin=self.admin_group in member_of, tokens=int(counts.get(row.name, 0)),
                              created_at=as_utc(row.created_at)))
        return found

    def actor(self, name: str) -> Actor:
        """Who `name` is when they act: their groups and rights as the directory has them now."""
        user = self.get_user(name)
        return Actor(user=user.name, group=user.group, groups=frozenset(user.groups), is_admin=user.is_admin)

    # --- tokens ------------------------------------------------------------------------------

    def issue_token(self, name: str) -> str:
        """A new token for the user (shown only here); their other tokens stay valid until revoked."""
        self.get_user(name)
        token = new_token()
        with self.engine.begin() as conn:
            self._insert_token(conn, name, token)
        return token

    @staticmethod
    def _insert_token(conn: sa.Connection, name: str, token: str) -> None:
        conn.execute(token_rows.insert().values(sha256=token_hash(token), user=name, issued_at=utcnow()))

    def revoke(self, name: str) -> int:
        """Revoke every token of the user; how many were still valid."""
        self.get_user(name)
        with self.engine.begin() as conn:
            return conn.execute(token_rows.update()
                                .where(token_rows.c.user == name, token_rows.c.revoked_at.is_(None))
                                .values(revoked_at=utcnow())).rowcount

    def authenticate(self, token: str) -> Actor | None:
        """The actor a token stands for; None for an unknown or revoked one. The lookup is by the
        token's hash, so comparing it leaks nothing about any stored token."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            return None
        with self.engine.connect() as conn:
            user = conn.execute(sa.select(token_rows.c.user).where(
                token_rows.c.sha256 == token_hash(token), token_rows.c.revoked_at.is_(None))).scalar()
        return self.actor(user) if user is not None else None


@lru_cache
def open_directory(url: str | None = None) -> Directory:
    """The directory of the catalog of these settings (same database, same engine)."""
    return Directory(open_catalog(url).engine)
