"""Platform pieces that need no worker: the heartbeat change (against Prefect's test harness), the
maintenance rules, the failure summary, and the deployments described from the flow registry."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

from catalog import rules
from catalog.model import Bus, DiskFormat, Image, ImageState, ImageType, Refused
from catalog.settings import Settings
from flows import heartbeat
from flows.launcher import deployable, maintenance, registry
import flows.launcher as launcher_module
from flows.platform import automation_specs, deployment_specs, render_prefect_yaml
from flows.reporting import failure_markdown, redact
from tests.conftest import REPO_ROOT

S = ImageState


@flow
def empty_flow() -> int:
    return 1


def test_the_heartbeat_change_is_in_place_for_the_prefect_it_was_read_from():
    """The time it saves is measured by bench/flow_run_overhead.py; here only that the version it
    was read from is the one installed, so an upgrade of Prefect makes someone re-read
    `flow_engine._send_heartbeats`."""
    import prefect

    assert prefect.__version__ == heartbeat.PATCHED_PREFECT_VERSION, (
        "Prefect changed: compare prefect.flow_engine._send_heartbeats with flows/heartbeat.py, then "
        "update PATCHED_PREFECT_VERSION")
    assert heartbeat.PREFECT_SEND_HEARTBEATS is not heartbeat._send_heartbeats


def _patched_in_a_fresh_process(code: str) -> bool:
    check = (f"{code}\nfrom prefect import flow_engine\n"
             "print(getattr(flow_engine._send_heartbeats, 'hcx_patched', False))")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_the_heartbeat_change_is_installed_only_where_flows_run():
    """Importing the flows or the CLI changes nothing in Prefect; resolving a deployment entrypoint
    (what a worker's flow-run process does) and the local launcher's `execute` install it."""
    assert not _patched_in_a_fresh_process("import flows, flows.upload, flows.launcher, flows.platform, cli.main")
    assert _patched_in_a_fresh_process(
        "from prefect.flows import load_flow_from_entrypoint\nload_flow_from_entrypoint('flows.launcher.upload')")
    assert "heartbeat.install()" in inspect.getsource(launcher_module.execute)


def test_heartbeats_are_still_sent(prefect_api):
    heartbeat.install()  # as in a process that runs flows
    state = empty_flow(return_state=True)
    run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 20
    beats = []
    while not beats and time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            beats = client.read_events(EventFilter(
                occurred=EventOccurredFilter(since=datetime.now(timezone.utc) - timedelta(minutes=5)),
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            ), limit=10).events
        time.sleep(0.5)
    assert len(beats) == 1  # sent at the start of the run; the next would come 30 s later


def _image(state: ImageState, **fields) -> Image:
    return Image(id=7, name="disk", owner="alice", group="users", type=ImageType.OS, persistent=False,
                 bus=Bus.VIRTIO, format=DiskFormat.RAW, datastore="default", state=state, **fields)


@pytest.mark.parametrize("state, awaits", [
    (S.LOCKED, True), (S.LOCKED_USED, True), (S.LOCKED_USED_PERS, True), (S.DELETE, True),
    (S.READY, False), (S.CLONE, False), (S.ERROR, False), (S.USED, False),
])
def test_awaits_operation(state, awaits):
    assert rules.awaits_operation(_image(state)) is awaits


def test_abandon_follows_the_failure_rules():
    assert rules.abandon(_image(S.LOCKED), "gone")["state"] is S.ERROR
    assert "gone" in rules.abandon(_image(S.LOCKED_USED), "gone")["error"]
    deleting = rules.abandon(_image(S.DELETE), "gone")
    assert deleting["state"] is S.ERROR and "Error removing image from datastore: gone" in deleting["error"]
    with pytest.raises(Refused, match="Cannot abandon the operation of image 7, it is in state READY"):
        rules.abandon(_image(S.READY), "gone")


def test_object_missing_and_checksum_mismatch_only_where_the_bytes_should_be():
    assert rules.object_missing(_image(S.USED, source="s3://b/k"), "s3://b/k")["state"] is S.ERROR
    with pytest.raises(Refused):
        rules.object_missing(_image(S.LOCKED), "s3://b/k")
    damaged = rules.checksum_mismatch(_image(S.READY, sha256="a" * 64), "b" * 64)
    assert damaged["state"] is S.ERROR and "Checksum mismatch" in damaged["error"]
    with pytest.raises(Refused):
        rules.checksum_mismatch(_image(S.DISABLED, sha256="a" * 64), "b" * 64)


def test_failure_summary_says_why_and_what_to_do():
    crashed = failure_markdown("upload", "upload disk -> default", "Crashed", "worker lost",
                               {7: _image(S.ERROR, error="boom")}, crashed=True)
    assert "**Reason:** worker lost" in crashed
    assert "The process running this flow died" in crashed
    assert "`hcx-image retry 7`" in crashed and "| 7 | disk | ERROR | boom |" in crashed
    refused = failure_markdown("upload", "upload x -> default", "Failed", "NAME is already taken", {}, crashed=False)
    assert "No image was registered or changed" in refused


def test_redact_masks_credentials_in_free_text():
    text = "connect failed: aws_secret_access_key=abcSECRET123 access_key: AKIAXYZ password='pw1' ok"
    assert redact(text) == "connect failed: aws_secret_access_key=**** access_key: **** password='****' ok"


def test_every_registered_flow_gets_a_deployment():
    specs = {spec["name"]: spec for spec in deployment_specs(Settings.model_construct())}
    assert set(specs) == set(registry()) | set(maintenance()) == set(deployable())
    for name, spec in specs.items():
        assert spec["entrypoint"] == f"flows.launcher.{name.replace('-', '_')}"
        assert spec["enforce_parameter_schema"] is True and spec["work_pool"]["name"] == "hcx-process"
    assert all(spec["triggers"] == [] for spec in specs.values())  # no event starts an operation
    assert {name: [s["interval"] for s in specs[name]["schedules"]] for name in maintenance()} == \
        {"reconcile": [300], "monitor": [300], "scrub": [86400]}
    import flows.launcher as launcher

    assert all(getattr(launcher, name.replace("-", "_")) is flow for name, flow in deployable().items())


def test_prefect_yaml_is_current():
    assert (REPO_ROOT / "prefect.yaml").read_text() == render_prefect_yaml(), \
        "prefect.yaml is out of date: run `hcx-image platform yaml`"


def test_intervals_are_settings_and_the_dead_run_automations_follow_them():
    settings = Settings(reconcile_every=40, monitor_every=0, scrub_every=7200, stale_run_seconds=75)
    specs = {spec["name"]: spec for spec in deployment_specs(settings)}
    assert {name: [s["interval"] for s in specs[name]["schedules"]] for name in maintenance()} == \
        {"reconcile": [40], "monitor": [], "scrub": [7200]}
    from prefect.events.schemas.automations import AutomationCore

    reconcile_id = str(uuid.uuid4())
    zombie, crashed = [AutomationCore.model_validate(a) for a in automation_specs(settings, reconcile_id)]
    assert zombie.trigger.posture.value == "Proactive" and zombie.trigger.within == timedelta(seconds=75)
    assert zombie.trigger.expect >= {"prefect.flow-run.heartbeat", "prefect.flow-run.Crashed"}
    assert zombie.trigger.after == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
    assert zombie.trigger.for_each == {"prefect.resource.id"}
    assert zombie.actions[0].type == "change-flow-run-state" and zombie.actions[0].state.value == "CRASHED"
    assert crashed.trigger.expect == {"prefect.flow-run.Crashed"}
    assert str(crashed.actions[0].deployment_id) == reconcile_id
    assert crashed.actions[0].parameters["flow_run_ids"] == [
        "{{ event.resource.id | replace('prefect.flow-run.', '') }}"]
    judged = crashed.trigger.match_related.model_dump()["prefect.resource.name"]
    assert sorted(judged) == sorted(f.name for n, f in deployable().items() if n in registry())


def test_a_stale_run_limit_below_the_heartbeat_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"HCX_STALE_RUN_SECONDS \(60\) must be above HCX_HEARTBEAT_SECONDS \(60\)"):
        Settings(heartbeat_seconds=60, stale_run_seconds=60)


def test_the_cli_reads_its_settings_from_the_environment_then_dot_env(tmp_path, monkeypatch):
    """The CLI does without pydantic-settings (a third of its start-up) but reads what the service's
    settings would: HCX_* variables first, then ./.env, then the defaults."""
    from cli.client import home, setting

    monkeypatch.chdir(tmp_path)
    for name in ("HCX_TOKEN", "HCX_API_URL", "HCX_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "someone"))
    assert setting("token") is None and home() == tmp_path / "someone" / ".hcx-images"
    assert Settings().home == home()  # the service's default is the same place

    (tmp_path / ".env").write_text("HCX_TOKEN=hcx_from_dotenv\nHCX_HOME=/srv/hcx\n")
    assert setting("token") == "hcx_from_dotenv" and home() == Path("/srv/hcx")
    monkeypatch.setenv("HCX_TOKEN", "hcx_from_env")
    assert setting("token") == "hcx_from_env"


def test_a_plain_http_api_gets_a_tls_context_that_trusts_nothing():
    """No CA bundle is loaded for an http API (16 ms a command); should TLS ever be spoken over it,
    no certificate verifies. An https API gets httpx's verified default."""
    import ssl

    from cli.client import tls_for

    context = tls_for("http://127.0.0.1:8080")
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert tls_for("https://images.example.org") is True


def test_prefect_clients_share_one_tls_context(prefect_api, monkeypatch):
    """Prefect builds a TLS context (the whole CA bundle) for each client unless given one; ours are
    given the process's own, so a client per request costs no bundle load, and they still work."""
    import ssl

    from blocks.prefect_api import prefect_client

    with prefect_client() as client:
        client.hello()
    built = []
    original = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(1) or original(*a, **k))
    for _ in range(3):
        with prefect_client() as client:
            assert client.hello().status_code == 200
    assert built == []
