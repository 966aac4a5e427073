"""The platform's flows run in this process against the session's Prefect harness, with their
reporting hooks (as deployments and the launcher run them): a failure's summary, monitor, and
reconcile's patience with an operation whose run has not started yet."""

from __future__ import annotations

import io
import json
import os
import time
import uuid

from prefect.client.orchestration import get_client

from blocks.datastore import S3Datastore
from catalog import operations
from catalog.model import ImageState
from flows.launcher import deployable
from flows.upload import upload
from flows.settle import settle_image
from tests.conftest import ALICE, image_events, run_artifacts


def test_failed_operation_leaves_a_summary_with_reason_and_next_step(catalog, make_request, unique_name):
    missing = uuid.uuid4().hex
    before = catalog.list()
    state = deployable()["upload"](make_request(unique_name("nothing"), upload_id=missing), return_state=True)
    assert state.is_failed()
    assert catalog.list() == before
    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert [a.key for a in artifacts if a.type == "markdown"] == ["upload-failure"]
    assert [a.key for a in artifacts if a.type == "table"] == []  # no image was affected
    text = next(a.data for a in artifacts if a.type == "markdown")
    assert "**Reason:**" in text and "not found" in text
    assert "No image was registered or changed: correct the request" in text


def test_monitor_reports_used_free_total_per_datastore(default_store, new_datastore):
    name = new_datastore(limit_bytes=1024**3)
    limited = S3Datastore.load(name)
    limited.upload(io.BytesIO(b"z" * 300_000), limited.image_ref("some-object"))

    state = deployable()["monitor"](datastores=["default", name], return_state=True)
    assert state.is_completed(), state.message
    measured = {m["datastore"]: m for m in state.result()}
    objects = default_store.list_keys(default_store.bucket, default_store.prefix)
    assert measured["default"]["used"] == sum(o["Size"] for o in objects)
    assert measured["default"]["total"] is None and measured["default"]["free"] is None
    assert {k: measured[name][k] for k in ("used", "free", "total", "objects", "catalog_used")} == \
        {"used": 300_000, "free": 1024**3 - 300_000, "total": 1024**3, "objects": 1, "catalog_used": 0}

    usage = next(a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "datastore-usage")
    rows = {r["datastore"]: r for r in json.loads(usage.data)}
    assert (rows[name]["used"], rows[name]["free"], rows[name]["total"]) == ("293K", "1023.7M", "1G")
    events = image_events("hcx.datastore.monitored", f"hcx.datastore.{name}")
    assert [e.payload["used"] for e in events] == [300_000]


def test_reconcile_waits_for_the_run_that_takes_up_a_newer_operation(catalog, default_store, make_request,
                                                                      unique_name, raw_file):
    """A delete the CLI marked after the image's upload run ended is not judged by that old run:
    reconcile waits for the delete's own run to record itself, and gives up only after the stale time."""
    upload_id = unique_name("up")
    with open(raw_file, "rb") as source:
        default_store.upload(source, default_store.staging_ref(upload_id))
    image = catalog.get(upload(make_request(unique_name(), upload_id=upload_id)))
    assert image.state is ImageState.READY
    time.sleep(2.1)  # past the grace given to the upload run's own hooks
    operations.delete(catalog, ALICE, image.id)

    assert settle_image.fn(image.id, 2) is None
    assert catalog.get(image.id).state is ImageState.DELETE
    time.sleep(2.1)  # no delete run recorded itself in time
    settled = settle_image.fn(image.id, 2)
    assert "no flow run was recorded for its operation" in settled["action"]
    assert catalog.get(image.id).state is ImageState.ERROR


def test_a_run_whose_process_died_before_it_began_is_crashed_by_its_launcher(default_store, make_request,
                                                                          unique_name):
    """The image API launched a run in a process of its own, which died before the run began (no
    heartbeat yet: nothing else would ever end it). The launcher supervises what it started, as a
    worker does (the image API asks it every second): the run is marked CRASHED, saying what happened."""
    import signal

    from flows import launcher

    upload_id = uuid.uuid4().hex
    default_store.upload(io.BytesIO(os.urandom(1024 * 1024)), default_store.staging_ref(upload_id))
    request = make_request(unique_name("stillborn"), upload_id=upload_id)
    run_id = launcher.submit("upload", {"request": request.model_dump(mode="json")}, remote=False)
    process = launcher._launched[run_id]
    os.kill(process.pid, signal.SIGKILL)  # long before python and prefect are imported
    process.wait(timeout=30)
    assert run_id in launcher.crash_runs_whose_process_died()
    assert launcher.crash_runs_whose_process_died() == []  # once
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.is_crashed() and "The process running this flow run exited (code -9)" in state.message
    # what the crash automation's reconcile then does: the run's own crash hooks sweep its staged bytes
    from flows.settle import settle_run

    settle_run.fn(run_id)
    assert not default_store.exists(default_store.staging_ref(upload_id))


def test_standbys_wait_loaded_and_the_oldest_takes_the_next_run(default_store, make_request, unique_name):
    """HCX_STANDBY_EXECUTORS (2) processes wait loaded; a run goes to the one waiting longest, the
    others stay for the next runs, a new one loads behind, and the run completes in the process
    that took it (its S3 and Prefect clients were built while it waited)."""
    from flows import launcher

    launcher.warm_up()
    waiting = [process for _, process in launcher._standbys]
    assert len(waiting) == 2 and all(process.poll() is None for process in waiting)

    upload_id = uuid.uuid4().hex
    default_store.upload(io.BytesIO(os.urandom(256 * 1024)), default_store.staging_ref(upload_id))
    request = make_request(unique_name("standby"), upload_id=upload_id)
    run_id = launcher.submit("upload", {"request": request.model_dump(mode="json")}, remote=False)

    assert launcher._launched[run_id] is waiting[0]
    still_waiting = [process for _, process in launcher._standbys]
    assert len(still_waiting) == 2 and still_waiting[0] is waiting[1] and waiting[0] not in still_waiting
    assert waiting[0].wait(timeout=120) == 0
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.is_completed(), state.message
