"""The state table on SQLite and PostgreSQL: compare-and-set under real concurrency, history rows,
name slots. Catalog-level (no flows): the rules themselves are covered with the operations."""

from __future__ import annotations

import functools
import uuid

import pytest
import sqlalchemy as sa

from catalog import rules
from catalog.model import Bus, DiskFormat, ImageState, ImageType, Refused
from catalog.permissions import Actor
from catalog.store import Catalog
from tests.conftest import all_at_once

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_catalog(request, tmp_path):
    if request.param == "sqlite":
        yield Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not running on 127.0.0.1:5432 ({exc.__class__.__name__})")
    name = f"hcx_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    catalog = Catalog(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    yield catalog
    catalog.engine.dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


ALICE = Actor(user="alice", group="users")


def new_image(catalog: Catalog, name: str = "golden", *, persistent: bool = False):
    return catalog.register(actor=ALICE, name=name, type_=ImageType.OS, persistent=persistent, bus=Bus.VIRTIO,
                            format_=DiskFormat.QCOW2, datastore="default", state=ImageState.READY)


def test_racing_transitions_never_both_win(fresh_catalog):
    """Twenty threads acquire the source of a clone at once, then release it: every change is
    counted exactly once and the image ends READY with counters at zero."""
    image = new_image(fresh_catalog)

    def clone_once(n: int) -> None:
        fresh_catalog.transition(image.id, rules.clone_source_acquire, 1000 + n)
        fresh_catalog.transition(image.id, rules.clone_source_release)

    assert all_at_once([functools.partial(clone_once, n) for n in range(20)]) == [None] * 20
    final = fresh_catalog.get(image.id)
    assert (final.state, final.cloning_ops, final.version) == (ImageState.READY, 0, 40)
    assert len(fresh_catalog.history(image.id)) == 41  # the registration and 40 transitions


def test_only_one_of_two_racing_deletes_wins_the_state(fresh_catalog):
    image = new_image(fresh_catalog)

    def delete() -> ImageState:
        return fresh_catalog.transition(image.id, rules.delete, force=False, is_admin=False).state

    results = all_at_once([delete, delete])
    # DELETE -> DELETE is allowed (a retried delete), so both succeed, but each saw a fresh row:
    history = fresh_catalog.history(image.id)
    assert results == [ImageState.DELETE, ImageState.DELETE]
    assert [(h["from_state"], h["to_state"]) for h in history[1:]] == [("READY", "DELETE"), ("DELETE", "DELETE")]


def test_names_are_unique_per_owner_and_free_once_deleting(fresh_catalog):
    image = new_image(fresh_catalog, "web")
    with pytest.raises(Refused, match=f"NAME is already taken by IMAGE {image.id}"):
        new_image(fresh_catalog, "web")
    other = fresh_catalog.register(actor=Actor(user="bob", group="users"), name="web", type_=ImageType.OS,
                                   persistent=False, bus=Bus.VIRTIO, format_=DiskFormat.RAW, datastore="default")
    assert other.owner == "bob"
    fresh_catalog.transition(image.id, rules.delete, force=False, is_admin=False)
    assert new_image(fresh_catalog, "web").name == "web"


def test_a_refused_transition_writes_nothing(fresh_catalog):
    image = new_image(fresh_catalog)
    before = (fresh_catalog.get(image.id), fresh_catalog.history(image.id))
    with pytest.raises(Refused, match="only DISABLED or ERROR images can be enabled"):
        fresh_catalog.transition(image.id, rules.enable)
    assert (fresh_catalog.get(image.id), fresh_catalog.history(image.id)) == before


def test_racing_clones_register_and_release_as_pairs(fresh_catalog):
    """Twenty threads each register a clone and take its source in one transaction, then finish it
    (the clone READY and the source released in one transaction): on SQLite and PostgreSQL alike,
    no pair is ever half done and the source ends READY with its counters at zero."""
    source = new_image(fresh_catalog, persistent=True)

    def clone_once(n: int) -> int:
        target = fresh_catalog.begin_clone(actor=ALICE, source_id=source.id, name=f"copy-{n}", datastore=None,
                                           persistent=False, description=None, object_id=f"obj-{n}")
        fresh_catalog.finish_clone(target.id, error=None if n % 4 else "copy failed")
        return target.id

    clones = all_at_once([functools.partial(clone_once, n) for n in range(20)])
    assert all(isinstance(i, int) for i in clones), clones
    final = fresh_catalog.get(source.id)
    assert (final.state, final.cloning_ops, final.cloning_id) == (ImageState.READY, 0, None)
    states = sorted(fresh_catalog.get(i).state.value for i in clones)
    assert states == ["ERROR"] * 5 + ["READY"] * 15
    assert all(fresh_catalog.get(i).cloning_id is None for i in clones)
    assert len(fresh_catalog.history(source.id)) == 41  # registration + 20 acquires + 20 releases


def test_a_deleted_image_id_is_never_given_again(fresh_catalog):
    """History rows, CLONING_ID and messages name images by id: a new image never reuses one."""
    new_image(fresh_catalog, "first")
    last = new_image(fresh_catalog, "second")
    fresh_catalog.transition(last.id, rules.delete, force=False, is_admin=False)
    fresh_catalog.remove(last.id)
    assert new_image(fresh_catalog, "third").id > last.id
