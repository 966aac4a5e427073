"""The scheduled flows, run on the platform's worker through their deployments: reconcile (an
image left LOCKED by a killed worker, orphan staging objects, incomplete multipart uploads, orphan
and missing image objects) and scrub (re-hash). Monitor runs in tests/test_platform_flows.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
import uuid

import pytest

from blocks.datastore import ObjectRef
from catalog.model import Bus, DiskFormat, ImageState, ImageType
from catalog.permissions import Actor
from cli.stack import descendants

ALICE = Actor(user="alice", group="users")


def _kill_worker(platform) -> None:
    """SIGKILL the worker and every process below it (the flow run it is executing), at once."""
    worker = platform.state.worker.pid
    for pid in (*reversed(descendants(worker)), worker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _upload_killed_while_locked(platform, source):
    """An upload through the deployment whose worker is killed while the image is LOCKED (the
    copy runs then for a fraction of a second: a lost race is tried again)."""
    for _ in range(3):
        upload_id = platform.stage(source)
        reply = platform.create_run("upload", {"request": {"owner": "alice", "name": f"killed-{upload_id[:6]}",
                                                           "upload_id": upload_id}})
        assert reply.status_code == 201, reply.text
        deadline = time.monotonic() + 90
        image = None
        while time.monotonic() < deadline and image is None:
            image = platform.catalog.find_by_upload_id(upload_id)
            time.sleep(0.005)
        assert image is not None, "the worker never registered the upload"
        _kill_worker(platform)
        image = platform.catalog.get(image.id)
        if image.state is ImageState.LOCKED:
            return image, reply.json()["id"]
        platform.hcx("up")  # lost the race: the run finished; start a worker and try again
    pytest.fail("could not kill the worker while the image was LOCKED in 3 attempts")


def _plant_ready_image(platform, store, data: bytes, name: str):
    """A READY row whose object holds `data` (as an upload leaves it)."""
    key = f"images/planted-{uuid.uuid4().hex}"
    store.upload(io.BytesIO(data), store.ref(key))
    return platform.catalog.register(
        actor=ALICE, name=name, type_=ImageType.DATABLOCK, persistent=False, bus=Bus.VIRTIO,
        format_=DiskFormat.RAW, datastore="default", state=ImageState.READY,
        source=f"s3://{store.bucket}/{key}", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )


def _report(platform, flow_run_id: str, key: str) -> list[dict]:
    found = [a for a in platform.artifacts(flow_run_id) if a["key"] == key]
    assert len(found) == 1, [a["key"] for a in platform.artifacts(flow_run_id)]
    return json.loads(found[0]["data"])


def test_reconcile_settles_killed_worker_image_and_sweeps_orphans(platform, tmp_path, finished_upload):
    source = tmp_path / "victim.raw"  # adopted where it is staged: the copy takes no longer for more bytes
    source.write_bytes(os.urandom(4 * 1024 * 1024))
    locked, killed_run = _upload_killed_while_locked(platform, source)
    assert platform.flow_run(killed_run)["state_type"] == "RUNNING"  # nobody told Prefect
    up = platform.hcx("up")  # a new worker, as an operator would start
    assert up.returncode == 0, up.stderr

    store = platform.datastore("default")
    orphan = store.staging_ref(f"orphan-{uuid.uuid4().hex}")
    store.upload(io.BytesIO(b"left behind by a crashed client" * 100), orphan)
    bucket, prefix = store.staging_area()
    stalled_key = f"{prefix}stalled-{uuid.uuid4().hex}"
    stalled = store.client().create_multipart_upload(Bucket=bucket, Key=stalled_key)
    store.client().upload_part(Bucket=bucket, Key=stalled_key, UploadId=stalled["UploadId"], PartNumber=1,
                               Body=b"p" * 1024)
    vanished = _plant_ready_image(platform, store, b"soon gone" * 1000, f"vanished-{uuid.uuid4().hex[:6]}")
    store.delete(ObjectRef.parse("default", vanished.source))

    ds = f"ds{uuid.uuid4().hex[:6]}"
    second = platform.add_datastore(ds, bucket=f"{ds}-images", staging_bucket=f"{ds}-staging")
    stray_image_object = second.image_ref("no-row-" + uuid.uuid4().hex)
    second.upload(io.BytesIO(b"x" * 4096), stray_image_object)
    old_staged = second.staging_ref("abandoned-" + uuid.uuid4().hex)
    second.upload(io.BytesIO(b"y" * 4096), old_staged)
    intact = platform.catalog.get(finished_upload["image"].id)

    reply = platform.create_run("reconcile", {"staging_ttl_hours": 0, "stale_after_seconds": 2})
    assert reply.status_code == 201, reply.text
    run = platform.wait_run(reply.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]

    # the image of the killed worker: its run marked CRASHED, the upload's own hooks ran -> ERROR
    settled = platform.catalog.get(locked.id)
    assert settled.state is ImageState.ERROR
    assert "Error copying image in the datastore" in settled.error and "marked crashed by reconcile" in settled.error
    assert platform.flow_run(killed_run)["state_type"] == "CRASHED"
    summary = [a for a in platform.artifacts(killed_run) if a["key"] == "upload-failure"]
    assert summary and "The process running this flow died" in summary[0]["data"]
    assert [e["event"] for e in platform.wait_for_events("hcx.image.", f"hcx.image.{locked.id}")] == \
        ["hcx.image.error"]

    # objects: staging orphans and the stalled multipart upload are gone, an unclaimed image object stays
    assert not store.exists(orphan)
    assert stalled_key not in [u["Key"] for u in store.list_multipart_uploads(bucket, prefix)]
    assert not second.exists(old_staged)
    assert second.exists(stray_image_object)
    missing = platform.catalog.get(vanished.id)
    assert missing.state is ImageState.ERROR and "is missing from the datastore" in missing.error
    assert platform.catalog.get(intact.id) == intact  # what is fine is left alone

    report = {(r["kind"], r["target"]): r["action"] for r in _report(platform, run["id"], "reconcile-report")}
    assert report[("staging object", str(orphan))].startswith("removed")
    assert report[("staging object", str(old_staged))].startswith("removed")
    assert report[("incomplete multipart upload", f"s3://{bucket}/{stalled_key}")].startswith("aborted")
    assert report[("orphan object", str(stray_image_object))].startswith("reported")
    assert report[("missing object", vanished.source)].endswith("-> ERROR")
    stuck = [action for (kind, target), action in report.items() if kind == "stuck image"]
    assert len(stuck) == 1 and "CRASHED" in stuck[0] and "now ERROR" in stuck[0]
    moved = _report(platform, run["id"], "reconcile-images")
    assert [(r["id"], r["state"]) for r in moved] == [(vanished.id, "ERROR")]


def test_scrub_moves_a_damaged_image_to_error_and_keeps_intact_ones(platform, tmp_path):
    store = platform.datastore("default")
    good = _plant_ready_image(platform, store, os.urandom(2 * 1024 * 1024), f"good-{uuid.uuid4().hex[:6]}")
    bad = _plant_ready_image(platform, store, os.urandom(2 * 1024 * 1024), f"bad-{uuid.uuid4().hex[:6]}")
    store.upload(io.BytesIO(os.urandom(2 * 1024 * 1024)), ObjectRef.parse("default", bad.source))  # bit rot

    result = platform.hcx("--remote", "scrub", good.id, bad.id, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    assert platform.catalog.get(good.id).state is ImageState.READY
    damaged = platform.catalog.get(bad.id)
    assert damaged.state is ImageState.ERROR and "Checksum mismatch" in damaged.error

    run_id = damaged.flow_run_id
    assert platform.flow_run(run_id)["deployment_id"] == platform.deployment_id("scrub")
    report = {r["target"]: r["action"] for r in _report(platform, run_id, "scrub-report")}
    assert report[f"image {good.id} ({good.name})"].startswith("ok")
    assert report[f"image {bad.id} ({bad.name})"].endswith("-> ERROR")
    assert len([a for a in platform.artifacts(run_id) if a["type"] == "progress"]) == 2
    assert [e["event"] for e in platform.wait_for_events("hcx.image.", f"hcx.image.{bad.id}")] == ["hcx.image.error"]
