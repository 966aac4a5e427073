"""The platform's flows run in this process against the session's Prefect harness, with their
reporting hooks (as deployments and the launcher run them): a failure's summary, monitor, and
reconcile's patience with an operation whose run has not started yet."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path

from prefect.client.orchestration import get_client

from blocks.datastore import S3Datastore
from catalog import operations
from catalog.model import ImageState
from flows.launcher import deployable
from flows.upload import upload
from flows.settle import settle_image
from tests.conftest import ALICE, flow_run_artifacts, recent_events


def test_failed_operation_leaves_a_summary_with_reason_and_next_step(catalog, make_request, unique_name):
    missing = uuid.uuid4().hex
    before = catalog.list()
    state = deployable()["upload"](make_request(unique_name("nothing"), upload_id=missing), return_state=True)
    assert state.is_failed()
    assert catalog.list() == before
    artifacts = flow_run_artifacts(state.state_details.flow_run_id)
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

    usage = next(a for a in flow_run_artifacts(state.state_details.flow_run_id) if a.key == "datastore-usage")
    rows = {r["datastore"]: r for r in json.loads(usage.data)}
    assert (rows[name]["used"], rows[name]["free"], rows[name]["total"]) == ("293K", "1023.7M", "1G")
    events = recent_events("hcx.datastore.monitored", f"hcx.datastore.{name}")
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


def test_the_fork_server_forks_each_runs_process_and_reports_its_exit(default_store, make_request, unique_name):
    """One loaded process forks the process of each run: a process of its own (its own session, a
    child of the server, not the server), recorded on the run, that completes the run; the server,
    single-threaded (fork safety), stays for the next run and reports each exit code. Killed, it
    is replaced by the next submit; a run it forked before it died is still seen to end."""
    import signal

    from flows import launcher

    def staged_upload(prefix: str) -> str:
        upload_id = uuid.uuid4().hex
        default_store.upload(io.BytesIO(os.urandom(256 * 1024)), default_store.staging_ref(upload_id))
        request = make_request(unique_name(prefix), upload_id=upload_id)
        return launcher.submit("upload", {"request": request.model_dump(mode="json")}, remote=False)

    def parent_and_session(pid: int) -> tuple[int, int]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[3])  # ppid, session

    launcher.warm_up()
    server = launcher._fork_server
    runs = [staged_upload("forked") for _ in range(2)]
    processes = [launcher._launched[run_id] for run_id in runs]
    for process in processes:
        assert process.pid != server.process.pid
        if Path(f"/proc/{process.pid}").exists() and process.returncode is None:
            assert parent_and_session(process.pid) == (server.process.pid, process.pid)
    assert [process.wait(timeout=120) for process in processes] == [0, 0]
    assert launcher._fork_server is server and server.alive()
    assert os.listdir(f"/proc/{server.process.pid}/task") == [str(server.process.pid)]  # one thread
    with get_client(sync_client=True) as client:
        for run_id, process in zip(runs, processes):
            run = client.read_flow_run(run_id)
            assert run.state.is_completed(), run.state.message
            assert run.infrastructure_pid.endswith(f":{process.pid}")

    orphan_run = staged_upload("orphaned")
    orphan = launcher._launched[orphan_run]
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    assert orphan.wait(timeout=120) in (None, 0)  # reported before the server died, or seen by the kernel
    replaced = staged_upload("after")
    assert launcher._fork_server is not server and launcher._launched[replaced].wait(timeout=120) == 0
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(orphan_run).state.is_completed()
        assert client.read_flow_run(replaced).state.is_completed()
