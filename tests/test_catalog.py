"""The state table on SQLite and PostgreSQL: compare-and-set under real concurrency, history rows,
name slots, the capacity lock, the lifecycle table and the fence of a flow run's writes.
Catalog-level (no flows): the rules themselves are covered with the operations.

PostgreSQL runs on every machine of this project (and in CI): a test that needs it fails when it
does not answer, it never skips."""

from __future__ import annotations

import functools

import pytest

from catalog import lifecycle, operations, rules
from catalog.model import ImageState, Refused, Superseded
from catalog.permissions import Actor
from catalog.requests import CloneRequest
from catalog.store import Catalog, Move
from tests.conftest import ALICE, all_at_once, catalog_snapshot, register_image

S = ImageState


def new_image(catalog: Catalog, name: str = "golden", *, persistent: bool = False, **fields):
    return register_image(catalog, name, persistent=persistent, **fields)


def test_racing_transitions_never_both_win(fresh_catalog):
    """Twenty threads acquire the source of a clone at once, then release it: every change is
    counted exactly once and the image ends READY with counters at zero."""
    image = new_image(fresh_catalog)

    def clone_once(n: int) -> None:
        fresh_catalog.transition(image.id, rules.clone_source_acquire, 1000 + n)
        fresh_catalog.transition(image.id, rules.clone_source_release)

    assert all_at_once([functools.partial(clone_once, n) for n in range(20)]) == [None] * 20
    final = fresh_catalog.get(image.id)
    assert (final.state, final.cloning_ops, final.version) == (S.READY, 0, 40)
    assert len(fresh_catalog.history(image.id)) == 41  # the registration and 40 transitions


def test_only_one_of_two_racing_deletes_wins_the_state(fresh_catalog):
    image = new_image(fresh_catalog)

    def delete() -> ImageState:
        return fresh_catalog.transition(image.id, rules.delete, force=False, is_admin=False).state

    results = all_at_once([delete, delete])
    # DELETE -> DELETE is allowed (a retried delete), so both succeed, but each saw a fresh row:
    history = fresh_catalog.history(image.id)
    assert results == [S.DELETE, S.DELETE]
    assert [(h["from_state"], h["to_state"]) for h in history[1:]] == [("READY", "DELETE"), ("DELETE", "DELETE")]


def test_names_are_unique_per_owner_and_free_once_deleting(fresh_catalog):
    image = new_image(fresh_catalog, "web")
    with pytest.raises(Refused, match=f"NAME is already taken by IMAGE {image.id}"):
        new_image(fresh_catalog, "web")
    other = register_image(fresh_catalog, "web", actor=Actor(user="bob", group="users"))
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
        request = CloneRequest(owner="alice", source_id=source.id, name=f"copy-{n}")
        run = f"run-{n}"
        target = operations.begin_clone(fresh_catalog, ALICE, request, object_id=f"obj-{n}", limit_bytes=None,
                                        run_id=run)
        error = None if n % 4 else "copy failed"
        if error is None:
            fresh_catalog.transition(target.id, rules.record, source=f"s3://b/obj-{n}", owner=run)
        operations.finish_clone(fresh_catalog, target.id, error=error, run_id=run)
        return target.id

    clones = all_at_once([functools.partial(clone_once, n) for n in range(20)])
    assert all(isinstance(i, int) for i in clones), clones
    final = fresh_catalog.get(source.id)
    assert (final.state, final.cloning_ops, final.cloning_id) == (S.READY, 0, None)
    states = sorted(fresh_catalog.get(i).state.value for i in clones)
    assert states == ["ERROR"] * 5 + ["READY"] * 15
    assert all(fresh_catalog.get(i).cloning_id is None for i in clones)
    assert len(fresh_catalog.history(source.id)) == 41  # registration + 20 acquires + 20 releases


def test_a_deleted_image_id_is_never_given_again(fresh_catalog):
    """History rows, CLONING_ID and messages name images by id: a new image never reuses one."""
    new_image(fresh_catalog, "first")
    last = new_image(fresh_catalog, "second")
    fresh_catalog.transition(last.id, rules.delete, force=False, is_admin=False)
    operations.remove(fresh_catalog, last.id, run_id=None)
    assert fresh_catalog.history(last.id)[-1]["to_state"] is None  # the removal, recorded
    assert new_image(fresh_catalog, "third").id > last.id


# --- capacity: the accounting lock ------------------------------------------------------------

def _registrations_that_pass(catalog: Catalog, datastore: str, *, racers: int, size: int, limit: int) -> int:
    def register(n: int):
        return register_image(catalog, f"img-{datastore}-{n}", datastore=datastore, size=size, limit_bytes=limit)

    results = all_at_once([functools.partial(register, n) for n in range(racers)])
    for result in results:  # a loser is refused for room, never by another error
        assert not isinstance(result, Exception) or "has no room for this image" in str(result), result
    return sum(not isinstance(r, Exception) for r in results)


def test_concurrent_registrations_never_overrun_capacity_on_postgresql(pg_catalog):
    """Twenty registrations race for room for five, twenty rounds: exactly five pass every round
    (the check and the insert run under the datastore's accounting row lock)."""
    passed = [_registrations_that_pass(pg_catalog, f"ds-{round_}", racers=20, size=600, limit=3000)
              for round_ in range(20)]
    assert passed == [5] * 20
    assert all(pg_catalog.used_bytes(f"ds-{r}") == 3000 for r in range(20))


def test_concurrent_registrations_never_overrun_capacity_on_sqlite(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    passed = [_registrations_that_pass(catalog, f"ds-{r}", racers=20, size=600, limit=3000) for r in range(5)]
    assert passed == [5] * 5


def test_concurrent_clones_never_overrun_capacity(fresh_catalog):
    """Clones count against their target datastore under the same lock as registrations."""
    source = new_image(fresh_catalog, size=600)

    def clone(n: int):
        request = CloneRequest(owner="alice", source_id=source.id, name=f"copy-{n}", datastore="small")
        return operations.begin_clone(fresh_catalog, ALICE, request, object_id=f"o{n}", limit_bytes=1800,
                                      run_id=f"r{n}")

    results = all_at_once([functools.partial(clone, n) for n in range(12)])
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert fresh_catalog.get(source.id).cloning_ops == 3


# --- the lifecycle table and invariants, enforced by the one write path -----------------------

def test_a_transition_outside_the_table_raises_and_writes_nothing(fresh_catalog):
    image = new_image(fresh_catalog)
    before = catalog_snapshot(fresh_catalog)
    with pytest.raises(lifecycle.BrokenInvariant, match="no transition READY -> LOCKED_USED"):
        fresh_catalog.transition(image.id, lambda i: {"state": S.LOCKED_USED, "running_vms": 1})
    with pytest.raises(lifecycle.BrokenInvariant, match="negative counters"):
        fresh_catalog.transition(image.id, lambda i: {"state": S.READY, "running_vms": -1})
    with pytest.raises(lifecycle.BrokenInvariant, match="DELETE still holds its name"):
        fresh_catalog.transition(image.id, lambda i: {"state": S.DELETE})
    assert catalog_snapshot(fresh_catalog) == before


# --- one writer per image: the fence ----------------------------------------------------------

def test_a_superseded_run_changes_nothing(fresh_catalog):
    """Run A registered the image; a forced delete took it over and run B carries the delete:
    every write of A (its success or failure hook, a record) is refused and changes nothing."""
    image = register_image(fresh_catalog, "locked", state=S.LOCKED, run_id="run-a", size=10)
    operations.delete(fresh_catalog, Actor("root", "oneadmin", is_admin=True), image.id, force=True)
    taken = operations.claim(fresh_catalog, fresh_catalog.get(image.id), "run-b")
    assert taken.flow_run_id == "run-b" and taken.last_operation.stops_run == "run-a"
    before = catalog_snapshot(fresh_catalog)
    for write in (lambda: fresh_catalog.transition(image.id, rules.record, source="s3://b/k", owner="run-a"),
                  lambda: fresh_catalog.transition(image.id, rules.delete_failed, "late hook", owner="run-a"),
                  lambda: operations.remove(fresh_catalog, image.id, run_id="run-a"),
                  lambda: operations.claim(fresh_catalog, fresh_catalog.get(image.id), "run-a")):
        with pytest.raises(Superseded, match="changed nothing"):
            write()
    assert catalog_snapshot(fresh_catalog) == before
    operations.remove(fresh_catalog, image.id, run_id="run-b")
    assert fresh_catalog.find(image.id) is None


def test_retry_hands_the_operation_to_the_run_that_takes_it_up(fresh_catalog):
    image = register_image(fresh_catalog, "failing", state=S.LOCKED, run_id="run-a", size=10,
                           last_operation=None)
    fresh_catalog.transition(image.id, rules.fail, "boom", owner="run-a")
    with fresh_catalog.engine.begin() as conn:  # an upload's record, as register_upload writes it
        from catalog.store import images
        conn.execute(images.update().where(images.c.id == image.id).values(
            last_operation={"op": "upload", "request": {"owner": "alice", "name": "failing"}, "upload_id": "u"}))
    retried = operations.retry(fresh_catalog, ALICE, image.id)
    assert (retried.state, retried.flow_run_id) == (S.LOCKED, None)
    with pytest.raises(Superseded):  # the failed run's late hook
        fresh_catalog.transition(image.id, rules.fail, "late", owner="run-a")
    operations.claim(fresh_catalog, fresh_catalog.get(image.id), "run-b")
    with pytest.raises(Superseded):  # nobody steals it from the run that took it up
        operations.claim(fresh_catalog, fresh_catalog.get(image.id), "run-c")
    messages = [h["message"] for h in fresh_catalog.history(image.id)]
    assert "operation taken up by flow run run-b" in messages


def test_racing_claims_leave_exactly_one_owner(fresh_catalog):
    image = register_image(fresh_catalog, "orphan", state=S.LOCKED, run_id=None, size=10)
    results = all_at_once([functools.partial(operations.claim, fresh_catalog, image, f"run-{n}") for n in range(10)])
    owners = [r.flow_run_id for r in results if not isinstance(r, Exception)]
    assert len(owners) == 1 and all(isinstance(r, Superseded) for r in results if isinstance(r, Exception))
    assert fresh_catalog.get(image.id).flow_run_id == owners[0]


def test_moves_are_checked_by_the_store_not_only_by_rules(fresh_catalog):
    """A plan made of hand-written moves cannot bypass the table (the store checks every step)."""
    image = new_image(fresh_catalog)
    with pytest.raises(lifecycle.BrokenInvariant):
        fresh_catalog.commit(lambda read: [Move(read(image.id), {"state": S.USED_PERS, "running_vms": 2}, "x")])
    assert fresh_catalog.get(image.id).state is S.READY


def test_a_run_takes_up_only_the_operation_the_image_waits_on(fresh_catalog):
    """A retried upload's run arriving after the image was force-deleted cannot take the DELETE over."""
    from catalog.model import Operation

    image = register_image(fresh_catalog, "raced", state=S.LOCKED, run_id="upload-1", size=10)
    operations.delete(fresh_catalog, Actor("root", "oneadmin", is_admin=True), image.id, force=True)
    before = catalog_snapshot(fresh_catalog)
    with pytest.raises(Superseded, match="waits on its delete; a run of upload cannot take it up"):
        operations.claim(fresh_catalog, fresh_catalog.get(image.id), "upload-2", Operation.UPLOAD)
    assert catalog_snapshot(fresh_catalog) == before
    assert operations.claim(fresh_catalog, fresh_catalog.get(image.id), "delete-1", Operation.DELETE).flow_run_id \
        == "delete-1"
