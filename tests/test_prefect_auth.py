"""Prefect behind the door: the `prefect server` that `hcx-image up` starts demands the auth string
kept mode 600 in $HCX_HOME/prefect-auth, listens on loopback only, and our own processes (worker,
flow runs, image API) carry the string in their environment, never on a command line or in a log.
$HCX_HOME is the owner's alone. The deployment forms offer no identity and no object ids."""

from __future__ import annotations

import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from cli.stack import Stack, descendants
from flows.launcher import deployable
from tests.conftest import TERMINAL, Platform, basic_auth, prefect_rest, proc_file, process_environment

HIDDEN_PARAMETERS = {"owner", "group", "object_id", "upload_id"}  # set by the image API, never on a form


def operator(platform: Platform) -> httpx.Client:
    """A REST client with the auth string, as an operator holding $HCX_HOME/prefect-auth."""
    return prefect_rest(platform, basic_auth(platform.stack.auth_string()))


def stack_processes(platform: Platform) -> list[int]:
    """Every process of the stack and what they started (flow runs included)."""
    state = platform.state
    pids = [s.pid for s in (state.s3, state.prefect, state.worker, state.api) if Stack.running(s)]
    return pids + [child for pid in pids for child in descendants(pid)]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def wait_run(client: httpx.Client, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/flow_runs/{run_id}").raise_for_status().json()
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout}s")


# --- the door -----------------------------------------------------------------------------------

def test_prefect_rest_answers_401_without_the_auth_string(platform):
    auth = platform.stack.auth_string()
    assert auth and len(auth) >= 40
    refused = {
        "none": {},
        "wrong": basic_auth(auth[:-1] + ("x" if auth[-1] != "x" else "y")),
        "user:password form": basic_auth(f"admin:{auth}"),
        "bearer": {"Authorization": f"Bearer {auth}"},
    }
    for what, headers in refused.items():
        with prefect_rest(platform, headers) as api:
            for reply in (api.post("/flows/filter", json={}), api.get("/admin/version"),
                          api.post("/deployments/filter", json={})):
                assert reply.status_code == 401, (what, reply.request.url, reply.text)
                assert reply.json() == {"exception_message": "Unauthorized"}
    with operator(platform) as api:
        assert api.post("/flows/filter", json={}).status_code == 200
        assert api.get("/admin/version").status_code == 200
        assert {d["name"] for d in api.post("/deployments/filter", json={}).json()} == set(deployable())
    with prefect_rest(platform) as api:  # Prefect leaves its probes open (GET only)
        assert api.get("/health").status_code == 200
        assert api.post("/health").status_code == 401


def test_block_secrets_are_unreadable_without_the_auth_string(platform):
    secret = platform.state.s3_secret_key
    query = {"include_secrets": True}
    for headers in ({}, basic_auth("guess")):
        with prefect_rest(platform, headers) as api:
            for path in ("/block_documents/filter", "/block_types/slug/hcx-datastore/block_documents"):
                reply = api.post(path, json=query) if path.endswith("filter") else api.get(path, params=query)
                assert reply.status_code == 401, (path, reply.text)
                assert secret not in reply.text
    with operator(platform) as api:  # the same query with the string does reach the secrets
        reply = api.post("/block_documents/filter", json=query)
    assert reply.status_code == 200 and secret in reply.text


def test_prefect_server_listens_on_loopback_only(platform):
    state = platform.state
    for port in (state.prefect.ports["port"], state.api.ports["port"]):
        assert listening_addresses(port) == {"0100007F"}, port  # 127.0.0.1, nothing else


def test_worker_and_flow_runs_carry_the_auth_string(platform):
    """A run of a deployment goes through the worker and a flow-run process of its own, each
    talking to the locked server: it completes, and its logs reached the server."""
    with operator(platform) as api:
        deployment = api.get("/deployments/name/monitor/monitor").raise_for_status().json()
        run = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": {}})
        assert run.status_code == 201, run.text
        finished = wait_run(api, run.json()["id"])
        assert finished["state_type"] == "COMPLETED", finished["state"]
        deadline = time.monotonic() + 30  # a run's last logs are sent in a batch after it ends
        while not any("Finished in state Completed" in entry["message"] for entry in api.post(
                "/logs/filter", json={"logs": {"flow_run_id": {"any_": [finished["id"]]}}}).json()):
            assert time.monotonic() < deadline, "the run's logs never reached the server"
            time.sleep(0.5)


# --- the secret stays secret ----------------------------------------------------------------------

def test_auth_string_is_in_no_log_no_database_and_on_no_command_line(platform):
    auth = platform.stack.auth_string().encode()
    files = [p for p in platform.home.rglob("*") if p.is_file() and not p.is_symlink()]
    assert {p.name for p in files} >= {"prefect-server.log", "worker.log", "seaweedfs.log", "api.log", "catalog.db"}
    # Logs, databases, S3 data: the string is kept in its own file and nowhere else.
    assert [p for p in files if auth in p.read_bytes()] == [platform.stack.auth_file]
    # nor in the Prefect server's database (this platform's is on PostgreSQL: all of its rows)
    database = platform.env["HCX_PREFECT_DATABASE_URL"].rsplit("/", 1)[1]
    dump = subprocess.run(["pg_dump", "--data-only", "-h", "127.0.0.1", "-U", "postgres", database],
                          capture_output=True, check=True).stdout
    assert b"flow_run" in dump and auth not in dump

    state = platform.state
    processes = stack_processes(platform)
    assert state.worker.pid in processes and state.api.pid in processes
    assert [pid for pid in processes if auth in proc_file(pid, "cmdline")] == []
    # Handed over in the environment instead: the server demands it, its clients send it.
    assert process_environment(state.prefect.pid)["PREFECT_SERVER_API_AUTH_STRING"] == auth.decode()
    for pid in (state.worker.pid, state.api.pid):
        assert process_environment(pid)["PREFECT_API_AUTH_STRING"] == auth.decode(), pid
    assert "PREFECT_SERVER_API_AUTH_STRING" not in process_environment(state.worker.pid)


def test_hcx_home_and_everything_in_it_is_the_owners_alone(platform):
    home = platform.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("prefect-auth", "stack.json"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    everything = [p for p in [home, *home.rglob("*")] if not p.is_symlink()]
    assert [p for p in everything if p.is_dir() and p.stat().st_mode & 0o077] == []  # nothing inside is reachable
    # SeaweedFS writes its volume-info files (.vif: a volume's version and replication, no data) 0644
    # whatever the umask, when a bucket gets a new volume; under 700 directories no one else reaches them.
    assert [p for p in everything if p.stat().st_mode & 0o077 and not (p.suffix == ".vif" and p.parent.name == "s3")] == []
    assert len(list(home.rglob("*"))) > 20  # the walk saw the services' files (logs, databases, S3 data)


# --- the forms ------------------------------------------------------------------------------------

def properties_anywhere(schema) -> set[str]:
    """Every property name of every object in a JSON schema, nested definitions included."""
    if isinstance(schema, list):
        return set().union(*map(properties_anywhere, schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    names = set(schema["properties"]) if isinstance(schema.get("properties"), dict) else set()
    return names.union(*map(properties_anywhere, schema.values()))


def test_deployment_forms_offer_no_identity_and_no_object_ids(platform):
    with operator(platform) as api:
        deployments = api.post("/deployments/filter", json={}).raise_for_status().json()
        automations = api.post("/automations/filter", json={}).raise_for_status().json()
    assert {d["name"] for d in deployments} == set(deployable())
    for deployment in deployments:
        schema = deployment["parameter_openapi_schema"]
        assert properties_anywhere(schema) & HIDDEN_PARAMETERS == set(), deployment["name"]
        assert deployment["enforce_parameter_schema"] is True
    upload = next(d for d in deployments if d["name"] == "upload")["parameter_openapi_schema"]
    assert {"name", "type", "datastore"} <= properties_anywhere(upload)  # the walk saw the request model
    # The staged-file event trigger is gone: no automation starts an upload from an event.
    assert [a["name"] for a in automations if any(
        action.get("deployment_id") == next(d["id"] for d in deployments if d["name"] == "upload")
        for action in a["actions"])] == []


def test_the_enforced_schema_still_takes_what_the_image_api_passes(platform):
    """The form hides owner and the server-made ids; a run the image API creates (with them) still
    validates, and the schema still refuses what is wrong. Runs are made SCHEDULED far ahead and
    deleted, so nothing executes."""
    later = {"type": "SCHEDULED", "state_details": {
        "scheduled_time": (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()}}
    requests = {
        "upload": {"owner": "alice", "name": "from-the-api", "type": "DATABLOCK", "upload_id": "0" * 32},
        "create-empty": {"owner": "alice", "name": "empty", "size": 1048576, "object_id": "a" * 32},
        "delete": {"owner": "alice", "image_id": 1},
    }
    with operator(platform) as api:
        ids = {d["name"]: d["id"] for d in api.post("/deployments/filter", json={}).json()}

        def create(name: str, request: dict) -> httpx.Response:
            return api.post(f"/deployments/{ids[name]}/create_flow_run",
                            json={"parameters": {"request": request}, "state": later})

        for name, request in requests.items():
            reply = create(name, request)
            assert reply.status_code == 201, (name, reply.text)
            assert reply.json()["parameters"]["request"]["owner"] == "alice"
            assert api.delete(f"/flow_runs/{reply.json()['id']}").status_code == 204
        wrong = create("upload", {"owner": "alice", "name": "x", "type": "FLOPPY"})
        assert wrong.status_code == 409 and "'FLOPPY' is not one of" in wrong.text
