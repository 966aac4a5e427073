"""Random sequences of lifecycle operations against the real catalog (SQLite and PostgreSQL),
with every invariant checked after every step (hypothesis, stateful).

The store refuses to write a row that breaks `catalog.lifecycle` (a `BrokenInvariant` here is a
rule computing an impossible row: the test fails on it); a refusal must change nothing; and
across rows, a clone source counts exactly the clone targets that hold it.
"""

from __future__ import annotations

import uuid

import hypothesis.strategies as st
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from catalog import lifecycle, operations, rules
from catalog.model import HcxError, ImageState, ImageType, Operation, OperationRecord
from catalog.permissions import Actor
from catalog.requests import CloneRequest
from catalog.store import Catalog, history
from tests.conftest import ALICE, register_image

S = ImageState
ADMIN = Actor(user="root", group="oneadmin", is_admin=True)
RUNS = ["run-1", "run-2", "run-3"]


class Lifecycle(RuleBasedStateMachine):
    """Operations a user, a flow's tasks and hooks, and reconcile perform, in any order and by any
    run (a superseded run included)."""

    catalog: Catalog  # set per test

    def __init__(self):
        super().__init__()
        self.ids: list[int] = []
        self.tag = uuid.uuid4().hex[:6]

    # --- helpers -------------------------------------------------------------------------------

    def attempt(self, action) -> None:
        """Run one operation: it succeeds, or it is refused and changes nothing."""
        before = self.snapshot()
        try:
            action()
        except lifecycle.BrokenInvariant:
            raise
        except HcxError:
            assert self.snapshot() == before, "a refused operation changed the catalog"

    def rows(self) -> list:
        return [image for image in map(self.catalog.find, self.ids) if image is not None]

    def snapshot(self) -> tuple:
        with self.catalog.engine.connect() as conn:
            written = conn.execute(sa.select(sa.func.count()).select_from(history)).scalar_one()
        return self.rows(), written

    def pick(self, data) -> int:
        """Mostly one of the newest images, so that operations pile up on the same rows."""
        if not self.ids:
            return -1
        return data.draw(st.one_of(st.sampled_from(self.ids[-2:]), st.sampled_from(self.ids)))

    def run_of(self, data, image_id: int) -> str | None:
        """Mostly the run that owns the image; sometimes another one (superseded) or none."""
        image = self.catalog.find(image_id)
        owner = image.flow_run_id if image is not None else None
        return data.draw(st.one_of(st.just(owner), st.sampled_from([*RUNS, None])))

    # --- creating ------------------------------------------------------------------------------

    @initialize(data=st.data(), persistent=st.booleans())
    def first_image(self, data, persistent):
        self.register(data, persistent)

    @rule(data=st.data(), persistent=st.booleans())
    def register(self, data, persistent):
        run = data.draw(st.sampled_from(RUNS))
        upload_id = uuid.uuid4().hex
        image = register_image(
            self.catalog, f"img-{self.tag}-{len(self.ids)}", state=S.LOCKED, run_id=run, persistent=persistent,
            size=10, upload_id=upload_id,
            last_operation=OperationRecord(op=Operation.UPLOAD, request={"owner": "alice", "name": "x"},
                                           upload_id=upload_id))
        self.ids.append(image.id)

    @rule(data=st.data(), persistent=st.booleans())
    def begin_clone(self, data, persistent):
        source_id, run = self.pick(data), data.draw(st.sampled_from(RUNS))
        request = CloneRequest(owner="alice", source_id=max(source_id, 0), name=f"clone-{uuid.uuid4().hex[:8]}",
                               persistent=persistent)

        def clone():
            target = operations.begin_clone(self.catalog, ALICE, request, object_id=uuid.uuid4().hex,
                                            limit_bytes=None, run_id=run)
            self.ids.append(target.id)

        self.attempt(clone)

    # --- what a flow's tasks and hooks do (as any run, maybe a superseded one) -----------------

    @rule(data=st.data())
    def copy_succeeds(self, data):
        image_id = self.pick(data)
        run = self.run_of(data, image_id)

        def succeed():
            image = self.catalog.transition(image_id, rules.record, source=f"s3://b/{image_id}", source_etag='"e"',
                                            owner=run)
            if rules.held_clone_source(image) is not None:
                operations.finish_clone(self.catalog, image_id, error=None, run_id=run)
            else:
                self.catalog.transition(image_id, rules.unlock, owner=run)

        self.attempt(succeed)

    @rule(data=st.data())
    def copy_fails(self, data):
        image_id = self.pick(data)
        run = self.run_of(data, image_id)

        def fail():
            image = self.catalog.get(image_id)
            if rules.held_clone_source(image) is not None:
                operations.finish_clone(self.catalog, image_id, error="copy failed", run_id=run)
            else:
                self.catalog.transition(image_id, rules.fail, "copy failed", owner=run)

        self.attempt(fail)

    @rule(data=st.data())
    def claim(self, data):
        image_id, run = self.pick(data), data.draw(st.sampled_from(RUNS))
        self.attempt(lambda: operations.claim(self.catalog, self.catalog.get(image_id), run))

    @rule(data=st.data())
    def reconcile_abandons(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: operations.abandon(self.catalog, image_id, "its run died",
                                                owner=self.catalog.get(image_id).flow_run_id, writer=None))

    @rule(data=st.data())
    def delete_fails(self, data):
        image_id = self.pick(data)
        run = self.run_of(data, image_id)
        self.attempt(lambda: self.catalog.transition(image_id, rules.delete_failed, "AccessDenied", owner=run))

    @rule(data=st.data())
    def remove(self, data):
        image_id = self.pick(data)
        run = self.run_of(data, image_id)
        self.attempt(lambda: operations.remove(self.catalog, image_id, run_id=run))

    # --- VMs -------------------------------------------------------------------------------------

    @rule(data=st.data(), hot=st.booleans())
    def vm_acquire(self, data, hot):
        image_id = self.pick(data)
        self.attempt(lambda: self.catalog.transition(image_id, rules.vm_acquire, hot))

    @rule(data=st.data(), failed=st.booleans())
    def vm_release(self, data, failed):
        image_id = self.pick(data)
        self.attempt(lambda: self.catalog.transition(image_id, rules.vm_release, failed))

    # --- what users ask for ----------------------------------------------------------------------

    @rule(data=st.data(), force=st.booleans(), admin=st.booleans())
    def delete(self, data, force, admin):
        image_id = self.pick(data)
        self.attempt(lambda: operations.delete(self.catalog, ADMIN if admin else ALICE, image_id, force=force,
                                               run_id=self.run_of(data, image_id)))

    @rule(data=st.data())
    def retry(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: operations.retry(self.catalog, ALICE, image_id))

    @rule(data=st.data())
    def enable(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: operations.enable(self.catalog, ALICE, image_id))

    @rule(data=st.data())
    def disable(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: operations.disable(self.catalog, ALICE, image_id))

    @rule(data=st.data(), persistent=st.booleans())
    def set_persistent(self, data, persistent):
        image_id = self.pick(data)
        self.attempt(lambda: operations.set_persistent(self.catalog, ALICE, image_id, persistent))

    @rule(data=st.data())
    def rename(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: operations.rename(self.catalog, ALICE, image_id, f"renamed-{uuid.uuid4().hex[:6]}"))

    @rule(data=st.data(), new_type=st.sampled_from(list(ImageType)))
    def chtype(self, data, new_type):
        image_id = self.pick(data)
        self.attempt(lambda: operations.change_type(self.catalog, ALICE, image_id, new_type))

    @rule(data=st.data(), mode=st.sampled_from([0o600, 0o640, 0o604, 0o400, 0o000, 0o700]), admin=st.booleans())
    def chmod(self, data, mode, admin):
        """Permissions change in any state but DELETE; alice may lock herself out (later operations
        of hers are then refused and change nothing)."""
        image_id = self.pick(data)
        self.attempt(lambda: operations.chmod(self.catalog, ADMIN if admin else ALICE, image_id, mode))

    @rule(data=st.data())
    def scrub_finds_damage(self, data):
        image_id = self.pick(data)
        self.attempt(lambda: self.catalog.transition(image_id, rules.checksum_mismatch, "0" * 64))

    # --- invariants, after every step ----------------------------------------------------------

    @invariant()
    def every_row_is_sound(self):
        rows = self.rows()
        for image in rows:
            assert lifecycle.violations(image, holds_name=image.name_held) == [], image
        for source in rows:
            holders = [t for t in rows if rules.held_clone_source(t) == source.id]
            assert source.cloning_ops == len(holders), (source, holders)


def _run(catalog: Catalog, examples: int) -> None:
    Lifecycle.catalog = catalog
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=examples, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_random_operations_keep_the_catalog_sound_on_sqlite(tmp_path):
    _run(Catalog(f"sqlite:///{tmp_path / 'catalog.db'}"), examples=80)


def test_random_operations_keep_the_catalog_sound_on_postgresql(pg_catalog):
    _run(pg_catalog, examples=40)
