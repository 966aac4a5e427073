"""The scheduled flows, run on the platform's worker through their deployments: reconcile (a
recorded upload never registered, staging objects and
incomplete multipart uploads nothing recorded (reported, left alone), orphan and missing image
objects) and scrub (re-hash). Monitor runs in tests/test_platform_flows.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

from blocks.datastore import ObjectRef
from catalog.model import DiskFormat, ImageState, ImageType
from catalog.permissions import Actor
from catalog.staging import StagingRecords
from tests.conftest import register_image

ALICE = Actor(user="alice", group="users")


def _plant_ready_image(platform, store, data: bytes, name: str):
    """A READY row whose object holds `data` (as an upload leaves it)."""
    key = f"images/planted-{uuid.uuid4().hex}"
    store.upload(io.BytesIO(data), store.ref(key))
    return register_image(platform.catalog, name, actor=ALICE, type_=ImageType.DATABLOCK, format_=DiskFormat.RAW,
                          source=f"s3://{store.bucket}/{key}", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _report(platform, flow_run_id: str, key: str) -> list[dict]:
    found = [a for a in platform.artifacts(flow_run_id) if a["key"] == key]
    assert len(found) == 1, [a["key"] for a in platform.artifacts(flow_run_id)]
    return json.loads(found[0]["data"])


def test_reconcile_settles_orphans_and_audits_objects(platform, tmp_path, finished_upload):
    """A run whose process died is Prefect's to mark CRASHED and reconcile's to settle on that
    crash: tests/test_platform_deadruns.py kills them."""
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
    recorded_id = uuid.uuid4().hex  # recorded by a client that staged it, then died before registering
    recorded = second.staging_ref(recorded_id)
    StagingRecords(platform.catalog.engine).record(upload_id=recorded_id, datastore=ds, bucket=recorded.bucket,
                                                   key=recorded.key, owner="alice", group="users")
    second.upload(io.BytesIO(b"z" * 4096), recorded)
    intact = platform.catalog.get(finished_upload["image"].id)

    reply = platform.create_run("reconcile", {"staging_ttl_hours": 0, "stale_after_seconds": 2,
                                              "requested_by": {"owner": "oneadmin"}})
    assert reply.status_code == 201, reply.text
    run = platform.wait_run(reply.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]

    # objects: the recorded upload never registered is gone; what nothing recorded stays, reported
    assert not second.exists(recorded) and StagingRecords(platform.catalog.engine).find(recorded_id) is None
    assert store.exists(orphan)
    assert stalled_key in [u["Key"] for u in store.list_multipart_uploads(bucket, prefix)]
    assert second.exists(old_staged)
    assert second.exists(stray_image_object)
    missing = platform.catalog.get(vanished.id)
    assert missing.state is ImageState.ERROR and "is missing from the datastore" in missing.error
    assert platform.catalog.get(intact.id) == intact  # what is fine is left alone

    report = {(r["kind"], r["target"]): r["action"] for r in _report(platform, run["id"], "reconcile-report")}
    assert report[("staged upload", str(recorded))].startswith("removed: recorded by alice (users)")
    assert report[("staging object", str(orphan))].startswith("left alone: no staging record or image knows it")
    assert report[("staging object", str(old_staged))].startswith("left alone")
    assert report[("incomplete multipart upload", f"s3://{bucket}/{stalled_key}")].startswith("left alone")
    assert report[("orphan object", str(stray_image_object))].startswith("reported")
    assert report[("missing object", vanished.source)].endswith("-> ERROR")
    assert [kind for kind, _ in report if kind == "stuck image"] == []
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

    run_id = result.stdout.split("FLOW RUN: ", 1)[1].split()[0]
    assert platform.flow_run(run_id)["deployment_id"] == platform.deployment_id("scrub")
    report = {r["target"]: r["action"] for r in _report(platform, run_id, "scrub-report")}
    assert report[f"image {good.id} ({good.name})"].startswith("ok")
    assert report[f"image {bad.id} ({bad.name})"].endswith("-> ERROR")
    assert len([a for a in platform.artifacts(run_id) if a["type"] == "progress"]) == 2
    assert [e["event"] for e in platform.wait_for_events("hcx.image.", f"hcx.image.{bad.id}")] == ["hcx.image.error"]
