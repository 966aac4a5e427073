"""Issue 8, items 1, 2 and 8, against a platform of this module's own (`hcx-image up` with a
15 s monitor schedule, a 5 s scheduler loop and a 60 s dead-run limit): scheduled runs really
happen; a run whose process is killed is marked CRASHED by Prefect's zombie-run automation and
settled through the crash automation, whether or not it registered its image; every CLI wait
ends; `up` restarts what died; no command starts a temporary Prefect server.

The slow waits (Prefect heartbeats every 30 s at the least) run side by side in one test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import stat
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from catalog.model import ImageState
from cli.stack import Service, Stack, descendants
from tests.conftest import HCX_CLI, REPO_ROOT, basic_auth, platform_up, prefect_rest, process_environment

STALE_SECONDS = 60  # HCX_STALE_RUN_SECONDS of this platform: the zombie automation's `within`
TEMPORARY_SERVER = "temporary server"  # what Prefect prints when it starts (and stops) an ephemeral API


@pytest.fixture(scope="module")
def quick_platform(tmp_path_factory):
    with platform_up(tmp_path_factory.mktemp("quick"), HCX_MONITOR_EVERY="15", HCX_RECONCILE_EVERY="3600",
                     HCX_STALE_RUN_SECONDS=str(STALE_SECONDS), HCX_URL_ALLOW_NETWORKS='["127.0.0.0/8"]',
                     PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5") as started:
        yield started


def _status(platform) -> dict:
    result = platform.hcx("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f}s")


def test_a_scheduled_run_happens_and_status_reports_it(quick_platform):
    platform = quick_platform
    assert _status(platform)["last_runs"]["scrub"] is None  # daily: not yet

    def scheduled_monitor_done():
        last = _status(platform)["last_runs"]["monitor"]
        return last if last and last["scheduled"] and last["state"] == "Completed" else None

    last = _wait_for("a scheduled monitor run that completed", scheduled_monitor_done, timeout=150, every=2)
    run = platform.flow_run(last["flow_run_id"])
    assert run["auto_scheduled"] and run["state_type"] == "COMPLETED"
    assert run["deployment_id"] == platform.deployment_id("monitor")
    assert run["created_by"]["type"] == "SCHEDULE"
    human = platform.hcx("status").stdout
    assert re.search(r"last monitor: +Completed at \S+, by its schedule", human), human  # a later run may have come
    server_log = (platform.home / "logs" / "prefect-server.log").read_text(errors="replace")
    assert "bulk DML" not in server_log  # SQLAlchemy 2.1 broke every scheduler cycle
    # the short schedule has proved itself: pause it, the rest of the module needs the CPU
    with platform.rest() as api:
        api.patch(f"/deployments/{platform.deployment_id('monitor')}", json={"paused": True}).raise_for_status()


def _processes_of(platform, flow_run_id: str) -> list[int]:
    """The process that runs the flow run, as recorded on it (`infrastructure_pid`, host:pid: the
    process the image API's fork server forked for it), or whose command line names it (a worker's flow-run process)."""
    recorded = platform.flow_run(flow_run_id).get("infrastructure_pid")
    if recorded and Stack.running(Service(pid=int(recorded.rsplit(":", 1)[1]))):
        return [int(recorded.rsplit(":", 1)[1])]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if flow_run_id.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _kill_worker(platform) -> None:
    """SIGKILL the worker and every process below it (the flow run it is executing), at once."""
    worker = platform.state.worker.pid
    victims = (*reversed(descendants(worker)), worker)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # SIGKILL is delivered asynchronously: wait until the kernel has ended them
    _wait_for("the killed worker gone", lambda: not any(Stack.running(Service(pid=p)) for p in victims),
              timeout=10, every=0.01)


def _upload_killed_while_locked(platform, source: Path) -> tuple[object, str, float]:
    """An upload through the deployment whose worker is killed while the image is LOCKED (the copy
    of an adopted upload takes a fraction of a second: a lost race is tried again). Returns the
    image, the flow run id and when it was killed."""
    for _ in range(3):
        upload_id = platform.stage(source)
        reply = platform.create_run("upload", {"request": {"name": f"killed-{upload_id[:6]}", "upload_id": upload_id}})
        assert reply.status_code == 201, reply.text
        image = _wait_for("the worker registering the upload",
                          lambda: platform.catalog.find_by_upload_id(upload_id), timeout=90, every=0.005)
        _kill_worker(platform)
        killed_at = time.monotonic()
        image = platform.catalog.get(image.id)
        if image.state is ImageState.LOCKED:
            return image, reply.json()["id"], killed_at
        platform.hcx("up")  # lost the race: the run finished; start a worker and try again
    pytest.fail("could not kill the worker while the image was LOCKED in 3 attempts")


class _StalledImage(BaseHTTPRequestHandler):
    """Announces 256 MiB, sends 24 MiB (three parts of a multipart upload) and holds the rest until
    the test lets go."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(256 * 1024 * 1024))
        self.end_headers()
        for _ in range(24):
            self.wfile.write(os.urandom(1024 * 1024))
        self.wfile.flush()
        self.release.wait(600)


@pytest.fixture
def stalled_image_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StalledImage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/big.raw"
    _StalledImage.release.set()
    server.shutdown()
    server.server_close()


def test_killed_runs_are_crashed_by_prefect_settled_and_no_wait_hangs(quick_platform, stalled_image_url, tmp_path):
    platform = quick_platform
    # 1. `hcx-image create --url --wait` (a local run), its flow-run process killed while it fetches
    #    the image (a server that stalls after 24 MiB): nothing registered, parts of a multipart upload
    #    staged. (A file's upload is registered a moment after its run starts: too soon to kill.)
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    create = subprocess.Popen([HCX_CLI, "create", "--name", name, "--type", "DATABLOCK", "--url", stalled_image_url,
                               "--wait"],
                              env={**platform.env, "PYTHONUNBUFFERED": "1"}, cwd=platform.home, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = create.stdout.readline()
        assert first.startswith("FLOW RUN: "), first + create.stderr.read()
        unregistered_run = first.split()[-1]
        store = platform.datastore("default")
        staged = store.staging_ref(platform.flow_run(unregistered_run)["parameters"]["request"]["upload_id"])
        _wait_for("the import fetching into the staging area",
                  lambda: store.list_multipart_uploads(staged.bucket, staged.key), timeout=60, every=0.05)
        victims = _processes_of(platform, unregistered_run)
        assert victims, "no process runs the upload"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        unregistered_killed_at = time.monotonic()
        assert platform.catalog.find_by_upload_id(
            platform.flow_run(unregistered_run)["parameters"]["request"]["upload_id"]) is None, \
            "killed too late: the image was registered already"
        # The service that launched it sees its process gone and marks the run CRASHED, which brings
        # the crash automation's reconcile to the worker: let it finish before the worker is killed below.
        _wait_for("the unregistered import's staged parts removed",
                  lambda: not store.list_multipart_uploads(staged.bucket, staged.key) and not store.exists(staged),
                  timeout=120)

        # 2. an upload through the deployment whose worker is killed while the image is LOCKED;
        #    `up` starts a new worker and leaves the rest as it was.
        source = tmp_path / "victim.raw"
        source.write_bytes(os.urandom(4 * 1024 * 1024))
        locked, registered_run, registered_killed_at = _upload_killed_while_locked(platform, source)
        before = platform.state
        assert not Stack.running(before.worker)
        up = platform.hcx("up")
        assert up.returncode == 0, up.stderr
        after = platform.state
        assert Stack.running(after.worker) and after.worker.pid != before.worker.pid
        assert (after.s3.pid, after.prefect.pid) == (before.s3.pid, before.prefect.pid)

        # Both end CRASHED. The CLI that launched the first run supervises its process as a worker
        # would, and marks it at once; the worker's run has nobody left to say so but Prefect's
        # zombie-run automation, once its heartbeats stop.
        crashed = {}
        said = {unregistered_run: "The process running this flow run exited (code -9)",
                registered_run: f"No heartbeat for {STALE_SECONDS}s"}
        for run_id, killed_at in ((unregistered_run, unregistered_killed_at), (registered_run, registered_killed_at)):
            run = _wait_for(f"flow run {run_id} CRASHED", lambda: (r := platform.flow_run(run_id))["state_type"]
                            == "CRASHED" and r, timeout=STALE_SECONDS + 120)
            crashed[run_id] = run
            print(f"flow run {run_id} marked CRASHED {time.monotonic() - killed_at:.0f}s after kill -9")
            assert said[run_id] in run["state"]["message"]

        # the CLI that followed the unregistered run ended: exit 1, what happened, what to do
        out, err = create.communicate(timeout=120)
    finally:
        if create.poll() is None:
            create.kill()
    assert create.returncode == 1, out + err
    assert "ended CRASHED before it registered the image" in err and "run the command again" in err
    assert said[unregistered_run] in err
    assert TEMPORARY_SERVER not in out + err
    assert [i for i in platform.catalog.list() if i.name == name] == []

    # the crash automation ran reconcile for each run: the upload's own crash hooks ran
    settled = _wait_for("the registered image in ERROR", lambda: (
        i := platform.catalog.get(locked.id)).state is ImageState.ERROR and i, timeout=120)
    assert "Error copying image in the datastore" in settled.error and "No heartbeat" in settled.error
    with platform.rest() as api:
        reconciles = api.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["reconcile"]}}}).json()
    triggered = {tuple(r["parameters"].get("flow_run_ids") or ()): r for r in reconciles
                 if r["created_by"] and r["created_by"]["type"] == "AUTOMATION"}
    assert {(unregistered_run,), (registered_run,)} <= triggered.keys()
    for run_id in (unregistered_run, registered_run):  # its hooks, the report's included, have run
        assert platform.wait_run(triggered[(run_id,)]["id"])["state_type"] == "COMPLETED"
    summary = [a for a in platform.artifacts(registered_run) if a["key"] == "upload-failure"]
    assert summary and "The process running this flow died" in summary[0]["data"]
    last = _status(platform)["last_runs"]["reconcile"]
    assert last is not None and last["scheduled"] is False


def test_delete_wait_ends_with_its_work_and_never_starts_a_temporary_server(quick_platform, tmp_path):
    platform = quick_platform
    source = tmp_path / "small.raw"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    name = f"brief-{uuid.uuid4().hex[:6]}"
    created = platform.hcx("create", "--name", name, "--path", source, "--wait")
    assert created.returncode == 0, created.stderr
    image_id = next(i.id for i in platform.catalog.list() if i.name == name)
    deleted = platform.hcx("delete", image_id, "--wait")
    assert deleted.returncode == 0, deleted.stderr
    assert f"image {image_id} deleted" in deleted.stdout
    assert platform.catalog.find(image_id) is None
    for result in (created, deleted):
        assert TEMPORARY_SERVER not in result.stdout + result.stderr


def test_a_prefect_call_without_an_api_is_an_error_never_a_temporary_server(tmp_path):
    """What makes a forgotten `running_platform` loud: the CLI's platform side (what `up` loads)
    turns Prefect's ephemeral mode off. (The other verbs do not load Prefect at all: test_api_access.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HCX_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), HCX_HOME=str(tmp_path / "home"))
    code = "import cli.runtime\nfrom prefect.client.orchestration import get_client\nget_client(sync_client=True)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "No Prefect API URL provided" in done.stderr
    assert TEMPORARY_SERVER not in done.stdout + done.stderr


def test_up_restarts_a_dead_api_and_rotates_the_auth_string(quick_platform):
    """`up` starts the image API on a port it keeps and starts it again when it died; with
    $HCX_HOME/prefect-auth deleted, `up` makes a new string and restarts the server and its clients
    with it. (`down` stopping everything, the image API and what it started included, is what
    `platform_up` checks when the module ends.)"""
    started = quick_platform
    state = started.state
    api_url = state.api_url
    assert api_url and httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    os.kill(state.api.pid, signal.SIGKILL)
    again = started.hcx("up", timeout=300)
    assert again.returncode == 0, again.stderr
    restarted = started.state
    assert restarted.api.pid != state.api.pid and restarted.api.ports == state.api.ports
    assert restarted.prefect.pid == state.prefect.pid and restarted.worker.pid == state.worker.pid
    assert httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    assert (started.home / "logs" / "api.log").stat().st_size > 0

    old = started.stack.auth_string()
    started.stack.auth_file.unlink()
    rotated = started.hcx("up", timeout=300)
    assert rotated.returncode == 0, rotated.stderr
    new, after = started.stack.auth_string(), started.state
    assert new and new != old and stat.S_IMODE(started.stack.auth_file.stat().st_mode) == 0o600
    assert {after.prefect.pid, after.worker.pid, after.api.pid}.isdisjoint(
        {restarted.prefect.pid, restarted.worker.pid, restarted.api.pid})
    with prefect_rest(started, basic_auth(old)) as api:
        assert api.post("/flows/filter", json={}).status_code == 401
    with prefect_rest(started, basic_auth(new)) as api:
        assert api.post("/flows/filter", json={}).status_code == 200
    for pid in (after.worker.pid, after.api.pid):
        assert process_environment(pid)["PREFECT_API_AUTH_STRING"] == new


def test_up_restarts_what_died(quick_platform):
    """Last in this module: the S3 server and the Prefect server killed at once, `up` again."""
    platform = quick_platform
    before = platform.state
    for service in (before.s3, before.prefect):
        os.killpg(service.pid, signal.SIGKILL)
    _wait_for("both gone", lambda: not Stack.running(before.s3) and not Stack.running(before.prefect), timeout=30,
              every=0.2)
    up = platform.hcx("up", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    after = platform.state
    assert after.s3.pid != before.s3.pid and after.prefect.pid != before.prefect.pid
    assert (after.s3.ports, after.prefect.ports) == (before.s3.ports, before.prefect.ports)
    status = _wait_for("the worker online again", lambda: (s := _status(platform))["worker"]["online"] and s,
                       timeout=120)
    assert status["s3"]["running"] and status["prefect"]["running"]
    again = platform.hcx("up")
    assert again.returncode == 0
    assert platform.pids() == [after.s3.pid, after.prefect.pid, platform.state.worker.pid, platform.state.api.pid]
    assert all(Stack.running(Service(pid=pid)) for pid in platform.pids())
