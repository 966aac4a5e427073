"""Upload (issue 2): stage -> register -> copy -> delete staging, through the real CLI and flow."""

from __future__ import annotations

import hashlib
import json
import re
import threading

import pytest

from blocks.datastore import ObjectRef, S3Datastore, load_datastore
from catalog.model import DiskFormat, ImageState, ImageType
from flows.upload import upload
from tests.conftest import qemu_img


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_id_from(output: str) -> int:
    return int(re.search(r"ID: (\d+)", output).group(1))


@pytest.mark.parametrize("fixture_name, driver", [("qcow2_file", "qcow2"), ("raw_file", "raw")])
def test_cli_upload_reaches_ready_and_exports_same_bytes(cli, request, tmp_path, unique_name, catalog,
                                                         default_store, staging_leftovers, fixture_name, driver):
    source = request.getfixturevalue(fixture_name)
    name = unique_name(driver)
    result = cli("create", "--name", name, "--type", "OS", "--path", source, "--driver", driver, "--wait")
    assert result.exit_code == 0, result.stderr
    image = catalog.get(image_id_from(result.stdout))
    assert image.state is ImageState.READY
    assert image.format.value == driver
    assert image.size == source.stat().st_size
    assert image.sha256 == sha256_of(source)
    assert [h["to_state"] for h in catalog.history(image.id)] == ["LOCKED", "LOCKED", "READY"]

    exported = tmp_path / "exported"
    result = cli("export", image.id, exported)
    assert result.exit_code == 0, result.stderr
    assert exported.read_bytes() == source.read_bytes()
    assert staging_leftovers(default_store) == []


def test_qcow2_records_virtual_size_and_show_json_keys(cli, qcow2_file, unique_name):
    result = cli("create", "--name", unique_name(), "--path", qcow2_file, "--wait")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(cli("show", image_id_from(result.stdout), "--json").stdout)
    assert {"id", "name", "type", "state", "persistent", "format", "size", "virtual_size", "sha256",
            "datastore", "source", "error"} <= shown.keys()
    assert shown["state"] == "READY" and shown["format"] == "qcow2"
    assert shown["virtual_size"] == 64 * 1024 * 1024
    listed = json.loads(cli("list", "--json").stdout)
    assert shown in listed


def test_list_shows_short_states(cli, raw_file, unique_name):
    name = unique_name()
    assert cli("create", "--name", name, "--type", "DATABLOCK", "--path", raw_file, "--wait").exit_code == 0
    table = cli("list").stdout
    row = next(line for line in table.splitlines() if name in line)
    assert "rdy" in row.split() and "DATABLOCK" in row.split()
    for column in ("ID", "USER", "GROUP", "NAME", "DATASTORE", "SIZE", "TYPE", "PER", "STAT", "RVMS"):
        assert column in table


def _object_count(store: S3Datastore) -> int:
    return len(store.list_keys(store.bucket, store.prefix))


@pytest.fixture
def refused_args(tmp_path, raw_file, qcow2_file):
    """The `create` arguments of each refusal case, given the name to use."""
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "16M")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(qcow2_file), "-F", "qcow2", str(child))
    return {
        "mismatch": lambda name: ["--name", name, "--path", raw_file, "--driver", "qcow2"],
        "unknown": lambda name: ["--name", name, "--path", vmdk],
        "missing": lambda name: ["--name", name, "--path", tmp_path / "no-such-file"],
        "duplicate": lambda name: ["--name", name, "--path", raw_file],
        "persistent_cdrom": lambda name: ["--name", name, "--path", raw_file, "--type", "CDROM", "--persistent"],
        "backing_file": lambda name: ["--name", name, "--path", child, "--driver", "qcow2"],
    }


@pytest.mark.parametrize(
    "case, message",
    [
        ("mismatch", "is raw (no disk format header found) but was declared qcow2"),
        ("unknown", "is in format 'vmdk', which hcx-images does not take"),
        ("missing", "does not exist or is not a regular file"),
        ("duplicate", "NAME is already taken by IMAGE"),
        ("persistent_cdrom", "A CDROM image is always non-persistent"),
        ("backing_file", "refused as unsafe (qcow2)"),
    ],
)
def test_refusals_change_nothing(cli, catalog, default_store, staging_leftovers, raw_file, unique_name,
                                 refused_args, case, message):
    taken = unique_name("taken")
    assert cli("create", "--name", taken, "--path", raw_file, "--wait").exit_code == 0
    name = taken if case == "duplicate" else unique_name()
    images_before = catalog.list()
    history_before = catalog.history(catalog.list()[-1].id)
    objects_before = _object_count(default_store)

    result = cli("create", *refused_args[case](name))

    assert result.exit_code == 1
    assert message in result.stderr
    assert catalog.list() == images_before
    assert catalog.history(images_before[-1].id) == history_before
    assert _object_count(default_store) == objects_before
    assert staging_leftovers(default_store) == []


def test_flow_refusal_of_staged_object_deletes_it(default_store, catalog, make_request, unique_name,
                                                  staging_leftovers, tmp_path):
    """An external tool staged a vmdk and asked for raw: refused, nothing registered, staging emptied."""
    vmdk = tmp_path / "x.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "16M")
    upload_id = unique_name("ext")
    with open(vmdk, "rb") as f:
        default_store.upload(f, default_store.staging_ref(upload_id))
    before = catalog.list()
    state = upload(make_request(unique_name(), upload_id=upload_id), return_state=True)
    assert state.is_failed()
    assert "vmdk" in state.message
    assert catalog.list() == before
    assert not default_store.exists(default_store.staging_ref(upload_id))
    assert staging_leftovers(default_store) == []


def test_upload_from_worker_path_and_datastore_with_separate_staging_bucket(
        stack_state, cli, catalog, make_request, unique_name, raw_file, staging_leftovers):
    """Staging in another bucket of the same endpoint: a server-side copy, then staging is emptied."""
    ds = unique_name("ds")
    result = cli("datastore", "add", ds, "--endpoint", stack_state.s3_endpoint, "--bucket", f"{ds}-images",
                 "--staging-bucket", f"{ds}-staging", "--prefix", "tenant-a",
                 "--access-key", stack_state.s3_access_key, "--secret-key", stack_state.s3_secret_key)
    assert result.exit_code == 0, result.stderr
    image_id = upload(make_request(unique_name(), datastore=ds, path=str(raw_file), type=ImageType.DATABLOCK))
    image = catalog.get(image_id)
    store = load_datastore(ds)
    assert image.state is ImageState.READY
    assert image.source.startswith(f"s3://{ds}-images/tenant-a/images/")
    assert store.head(ObjectRef.parse(ds, image.source)).size == raw_file.stat().st_size
    assert store.list_keys(f"{ds}-staging", "") == []
    assert staging_leftovers(store) == []
    listed = cli("datastore", "list", "--json")
    assert stack_state.s3_secret_key not in listed.stdout
    assert ds in listed.stdout


def test_transient_fault_during_copy_is_retried(stack_state, cli, catalog, make_request, unique_name,
                                                qcow2_file, cuttable_proxy, default_store):
    """The link to S3 is cut for a few seconds while the flow runs: tasks retry, the image ends READY."""
    ds = unique_name("flaky")
    assert cli("datastore", "add", ds, "--endpoint", cuttable_proxy.endpoint, "--bucket", f"{ds}-b",
               "--access-key", stack_state.s3_access_key,
               "--secret-key", stack_state.s3_secret_key).exit_code == 0
    upload_id = unique_name("up")
    store = load_datastore(ds)
    with open(qcow2_file, "rb") as f:
        store.upload(f, store.staging_ref(upload_id))
    cuttable_proxy.cut(4.0)
    threading.Timer(0.5, cuttable_proxy.cut, args=(3.0,)).start()
    image_id = upload(make_request(unique_name(), datastore=ds, upload_id=upload_id, driver=DiskFormat.QCOW2))
    image = catalog.get(image_id)
    assert cuttable_proxy.refused > 0
    assert image.state is ImageState.READY
    assert image.sha256 == sha256_of(qcow2_file)


@pytest.mark.parametrize("case", ["bad limit", "bad kind", "taken name", "wrong secret"])
def test_datastore_add_refusals_change_nothing(stack_state, cli, default_store, unique_name, case):
    """Refused before anything is saved: no block written or changed, no bucket created."""
    ds = unique_name("ds")
    args = {"name": ds, "secret": stack_state.s3_secret_key, "extra": []}
    message = {
        "bad limit": "Invalid size 'lots'", "bad kind": "Unknown --kind 'scratch'",
        "taken name": "Datastore 'default' already exists", "wrong secret": f"create bucket {ds}-b",
    }[case]
    if case == "bad limit":
        args["extra"] = ["--limit", "lots"]
    elif case == "bad kind":
        args["extra"] = ["--kind", "scratch"]
    elif case == "taken name":
        args["name"] = "default"
    else:
        args["secret"] = "not-the-secret"
    listed_before = json.loads(cli("datastore", "list", "--json").stdout)
    buckets_before = {b["Name"] for b in default_store.client().list_buckets()["Buckets"]}

    result = cli("datastore", "add", args["name"], "--endpoint", stack_state.s3_endpoint, "--bucket", f"{ds}-b",
                 "--access-key", stack_state.s3_access_key, "--secret-key", args["secret"], *args["extra"])

    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert "not-the-secret" not in result.stderr
    assert json.loads(cli("datastore", "list", "--json").stdout) == listed_before
    assert {b["Name"] for b in default_store.client().list_buckets()["Buckets"]} == buckets_before
