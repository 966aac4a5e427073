"""Issue 4: the platform against a real `prefect server`, a real worker on the process pool and a
real SeaweedFS, all started by `hcx-image up` (the `platform` fixture) and driven as users and
external tools would: the CLI, the REST API, events."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from datetime import datetime, timezone

from flows.launcher import deployable, maintenance
from flows.platform import render_prefect_yaml
from tests.conftest import REPO_ROOT

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _deployments(platform) -> dict[str, dict]:
    with platform.rest() as api:
        return {d["name"]: d for d in api.post("/deployments/filter", json={}).raise_for_status().json()}


def test_up_runs_everything_and_status_says_where(platform):
    status = json.loads(platform.hcx("status", "--json").stdout)
    assert {"s3_endpoint", "prefect_api_url", "prefect_ui_url", "worker"} <= status.keys()
    assert status["prefect_api_url"] == platform.api_url
    assert status["s3_endpoint"] == platform.state.s3_endpoint
    assert status["worker"]["running"] and status["worker"]["online"]
    assert status["worker"]["pool"] == "hcx-process"
    assert {d["name"] for d in status["deployments"]} == {f"{f.name}/{n}" for n, f in deployable().items()}
    schedules = {d["name"]: d["schedules"] for d in status["deployments"]}
    assert schedules["reconcile/reconcile"] == ["every 300s"] and schedules["scrub/scrub"] == ["every 86400s"]
    assert schedules["upload/upload"] == []
    assert platform.state.s3_secret_key not in json.dumps(status)
    ui = platform.rest().get(status["prefect_ui_url"] + "/deployments", headers={"Accept": "text/html"})
    assert ui.status_code == 200 and "<html" in ui.text.lower()

    pids = platform.pids()
    again = platform.hcx("up")
    assert again.returncode == 0, again.stderr
    assert platform.pids() == pids, "a second `up` must reuse what runs"
    assert "Worker:" in again.stdout and "running" in again.stdout


def test_every_deployment_is_typed_enforced_and_on_the_process_pool(platform):
    found = _deployments(platform)
    assert set(found) == set(deployable())
    for name, deployment in found.items():
        assert deployment["work_pool_name"] == "hcx-process"
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["entrypoint"] == f"flows.launcher.{name.replace('-', '_')}"
        assert deployment["parameter_openapi_schema"]["properties"], name
    upload = found["upload"]["parameter_openapi_schema"]
    request = upload["definitions"]["UploadRequest"]["properties"]
    assert upload["properties"]["request"]["$ref"].endswith("/UploadRequest")
    assert upload["definitions"]["ImageType"]["enum"] == ["OS", "CDROM", "DATABLOCK"]
    assert {"name", "type", "datastore", "driver"} <= request.keys()
    assert not {"owner", "upload_id"} & request.keys()  # set by the image API, never on the form
    scope = found["reconcile"]["parameter_openapi_schema"]["properties"]["scope"]
    assert scope["enum"] == ["all", "images", "objects"]
    for name in maintenance():
        assert [s["schedule"].get("interval") for s in found[name]["schedules"]] != []


def test_rest_flow_run_of_upload_deployment_reaches_ready(platform, finished_upload):
    run, image, name = finished_upload["flow_run"], finished_upload["image"], finished_upload["name"]
    source = finished_upload["source"]
    assert image is not None and image.state.value == "READY"
    assert image.size == source.stat().st_size
    assert run["name"] == f"upload {name} -> default"
    assert run["deployment_id"] == platform.deployment_id("upload")
    listed = json.loads(platform.hcx("list", "--json").stdout)
    assert [i["state"] for i in listed if i["id"] == image.id] == ["READY"]

    artifacts = platform.artifacts(run["id"])
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and all(a["data"] == 100 for a in progress)
    table = [a for a in artifacts if a["type"] == "table"]
    # One keyed table, whose every version is right: CI once saw two identical versions under load
    # (most likely Prefect's client sending the create again after a slow answer).
    assert {a["key"] for a in table} == {"upload-images"}
    for version in table:
        rows = json.loads(version["data"])
        assert [(r["id"], r["name"], r["state"]) for r in rows] == [(image.id, name, "READY")]

    events = platform.wait_for_events("hcx.image.", f"hcx.image.{image.id}")
    assert [e["event"] for e in events] == ["hcx.image.ready"]
    assert events[0]["payload"]["flow_run_id"] == run["id"]


def test_secrets_stay_out_of_logs_artifacts_events_and_catalog(platform, finished_upload):
    secret = platform.state.s3_secret_key
    access = platform.state.s3_access_key
    run_id = finished_upload["flow_run"]["id"]
    said = json.dumps([platform.artifacts(run_id), platform.logs(run_id), platform.events("hcx."),
                       [i.to_dict() for i in platform.catalog.list()],
                       [platform.catalog.history(i.id) for i in platform.catalog.list()]], default=str)
    said += (platform.home / "logs" / "worker.log").read_text(errors="replace")
    assert run_id in said  # the places were really read
    assert secret not in said and access not in said


def test_invalid_parameters_are_refused_by_the_api(platform):
    before = platform.rest().post("/flow_runs/count", json={}).json()
    bad_type = platform.create_run("upload", {"request": {"owner": "alice", "name": "x", "type": "FLOPPY"}})
    assert bad_type.status_code == 409
    assert "Validation failed for field 'request.type'" in bad_type.text
    assert "'FLOPPY' is not one of ['OS', 'CDROM', 'DATABLOCK']" in bad_type.text
    no_name = platform.create_run("upload", {"request": {"owner": "alice"}})
    assert no_name.status_code == 409
    assert "'name' is a required property" in no_name.text
    bad_scope = platform.create_run("reconcile", {"scope": "everything"})
    assert bad_scope.status_code == 409 and "'everything' is not one of" in bad_scope.text
    assert platform.rest().post("/flow_runs/count", json={}).json() == before


def test_cli_remote_create_returns_the_flow_run_id_at_once(platform, tmp_path):
    """HCX_REMOTE=1 (or --remote): the staged upload goes to the upload deployment; the CLI prints
    the flow-run id and returns without waiting for the worker."""
    source = tmp_path / "remote.raw"
    source.write_bytes(b"\x5a" * (3 * 1024 * 1024))
    name = f"remote-{uuid.uuid4().hex[:6]}"
    result = platform.hcx("--remote", "create", "--name", name, "--path", source)
    assert result.returncode == 0, result.stderr
    run_id = re.fullmatch(rf"FLOW RUN: ({UUID_RE})", result.stdout.strip()).group(1)
    assert platform.flow_run(run_id)["deployment_id"] == platform.deployment_id("upload")
    assert platform.wait_run(run_id)["state_type"] == "COMPLETED"
    image = next(i for i in platform.catalog.list() if i.name == name)
    assert image.state.value == "READY" and image.flow_run_id == run_id


def test_a_staged_event_from_outside_registers_nothing(platform, tmp_path):
    """The event that once registered bytes staged by an external tool (its payload naming the
    owner and the upload id) is gone: posted now, with bytes really staged, it starts no run and
    registers no image; the bytes stay the service's unknown objects (reconcile reports them)."""
    source = tmp_path / "external.raw"
    source.write_bytes(b"\x11" * (2 * 1024 * 1024))
    upload_id = platform.stage(source)
    with platform.rest() as api:
        runs_before = api.post("/flow_runs/count", json={}).json()
        event = {
            "id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(), "event": "hcx.image.staged",
            "resource": {"prefect.resource.id": f"hcx.upload.{upload_id}"},
            "payload": {"request": {"owner": "bob", "name": f"evt-{upload_id[:8]}", "type": "DATABLOCK",
                                    "upload_id": upload_id}},
        }
        assert api.post("/events", json=[event]).status_code == 204
        time.sleep(10)  # the automations service reacts within a few seconds when a trigger matches
        assert api.post("/flow_runs/count", json={}).json() == runs_before
    assert platform.catalog.find_by_upload_id(upload_id) is None
    store = platform.datastore("default")
    store.delete(store.staging_ref(upload_id))


def test_prefect_yaml_is_current_and_prefect_deploy_all_applies_the_same_deployments(platform):
    assert (REPO_ROOT / "prefect.yaml").read_text() == render_prefect_yaml(), \
        "prefect.yaml is out of date: run `hcx-image platform yaml`"
    before = _deployments(platform)
    # the operator's way in: the auth string of $HCX_HOME/prefect-auth
    env = {**platform.env, "PREFECT_API_URL": platform.api_url, "PREFECT_API_AUTH_STRING": platform.stack.auth_string()}
    deploy = subprocess.run([str(REPO_ROOT / ".venv/bin/prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    after = _deployments(platform)
    keys = ("id", "entrypoint", "work_pool_name", "enforce_parameter_schema", "parameter_openapi_schema", "tags")
    for name in before:
        assert {k: after[name][k] for k in keys} == {k: before[name][k] for k in keys}, name
        assert not after[name]["pull_steps"] and not before[name]["pull_steps"], name
        intervals = lambda d: sorted(s["schedule"].get("interval") for s in d["schedules"])  # noqa: E731
        assert intervals(after[name]) == intervals(before[name]), name
    register = subprocess.run([str(REPO_ROOT / ".venv/bin/prefect"), "block", "register", "-m", "blocks.datastore"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert register.returncode == 0 and "HCX Datastore" in register.stdout, register.stdout + register.stderr
