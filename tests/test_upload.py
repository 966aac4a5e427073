"""Upload (issue 2): stage -> register -> copy -> delete staging, through the real CLI and flow."""

from __future__ import annotations

import hashlib
import io
import os
import json
import re
import struct
import threading
import uuid

import pytest

from blocks.datastore import ObjectRef, S3Datastore, load_datastore
from catalog.model import DiskFormat, ImageState, ImageType
from flows.upload import upload
from tests.conftest import ISO_DESCRIPTOR, catalog_snapshot, make_iso, make_qcow2_claiming, patch_file, qemu_img


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


def iso_hiding_qcow2(path, qcow2_file):
    """A real ISO whose system area is a qcow2's first 32 KiB (a format hidden in another)."""
    iso = make_iso(path)
    return patch_file(iso, 0, qcow2_file.read_bytes()[:ISO_DESCRIPTOR])


@pytest.fixture
def refused_args(tmp_path, raw_file, qcow2_file):
    """The `create` arguments of each refusal case, given the name to use."""
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "16M")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(qcow2_file), "-F", "qcow2", str(child))
    empty = tmp_path / "empty.raw"
    empty.touch()
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(1024 * 1024))
    eib = make_qcow2_claiming(tmp_path / "eib.qcow2", 2**60)
    u64_max = make_qcow2_claiming(tmp_path / "max.qcow2", 2**64 - 1)
    hidden = iso_hiding_qcow2(tmp_path / "hidden.iso", qcow2_file)
    return {
        "empty": lambda name: ["--name", name, "--path", empty],
        "eib_qcow2": lambda name: ["--name", name, "--path", eib],
        "u64_max_qcow2": lambda name: ["--name", name, "--path", u64_max, "--driver", "qcow2"],
        "qcow2_in_iso": lambda name: ["--name", name, "--type", "CDROM", "--path", hidden],
        "mismatch": lambda name: ["--name", name, "--path", raw_file, "--driver", "qcow2"],
        "unknown": lambda name: ["--name", name, "--path", vmdk],
        "missing": lambda name: ["--name", name, "--path", tmp_path / "no-such-file"],
        # another file under a name taken (the same file again would be the same create: its image)
        "duplicate": lambda name: ["--name", name, "--path", other],
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
        ("empty", "is empty (0 bytes): there is no disk in it"),
        ("eib_qcow2", "header claims a virtual size of 1048576T (1152921504606846976 bytes), above the largest"),
        ("u64_max_qcow2", "header claims a virtual size of 16777216T (18446744073709551615 bytes)"),
        ("qcow2_in_iso", "matches several formats at once (iso, qcow2): one format is hidden in another"),
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


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty (0 bytes)"),
    ("eib_qcow2", "header claims a virtual size of 1048576T"),
    ("u64_max_qcow2", "header claims a virtual size of 16777216T (18446744073709551615 bytes)"),
    ("qcow2_in_iso", "matches several formats at once (iso, qcow2)"),
])
def test_flow_refuses_staged_bytes_of_impossible_size_or_hidden_format(
        default_store, catalog, make_request, unique_name, staging_leftovers, tmp_path, qcow2_file, case, message):
    """Bytes staged by another tool (or the REST API): refused by the flow's inspection, nothing
    registered, the staged object gone."""
    path = {
        "empty": lambda: tmp_path / "empty.raw",
        "eib_qcow2": lambda: make_qcow2_claiming(tmp_path / "eib.qcow2", 2**60),
        "u64_max_qcow2": lambda: make_qcow2_claiming(tmp_path / "max.qcow2", 2**64 - 1),
        "qcow2_in_iso": lambda: iso_hiding_qcow2(tmp_path / "hidden.iso", qcow2_file),
    }[case]()
    data = path.read_bytes() if path.exists() else b""
    upload_id = unique_name("ext")
    default_store.upload(io.BytesIO(data), default_store.staging_ref(upload_id))
    before = catalog_snapshot(catalog)
    state = upload(make_request(unique_name(), upload_id=upload_id, type=ImageType.CDROM), return_state=True)
    assert state.is_failed()
    assert message in state.message
    assert catalog_snapshot(catalog) == before
    assert not default_store.exists(default_store.staging_ref(upload_id))
    assert staging_leftovers(default_store) == []


@pytest.mark.parametrize("hybrid, type_", [("gpt", "CDROM"), ("mbr", "OS")])
def test_hybrid_iso_is_registered_raw_with_its_byte_size(cli, catalog, tmp_path, unique_name, default_store,
                                                        staging_leftovers, hybrid, type_):
    """A bootable ISO as distributions ship it (ISO 9660 plus an MBR/GPT for USB sticks) is raw, as
    a CDROM or an OS image, and its virtual size is its byte size."""
    iso = make_iso(tmp_path / "distro.iso", hybrid=hybrid)
    result = cli("create", "--name", unique_name("iso"), "--type", type_, "--path", iso, "--wait")
    assert result.exit_code == 0, result.stderr
    image = catalog.get(image_id_from(result.stdout))
    assert (image.state, image.type, image.format) == (ImageState.READY, ImageType(type_), DiskFormat.RAW)
    assert image.size == image.virtual_size == iso.stat().st_size
    assert image.sha256 == sha256_of(iso)
    assert "iso+gpt" in catalog.history(image.id)[0]["message"]
    assert staging_leftovers(default_store) == []


def test_iso_whose_descriptor_lies_is_recorded_with_its_byte_size(catalog, make_request, unique_name, tmp_path):
    """The volume descriptor claims 0xFFFFFFFF blocks of 64 KiB (~256 TiB); the bytes are < 1 MiB."""
    iso = make_iso(tmp_path / "liar.iso")
    patch_file(iso, ISO_DESCRIPTOR + 80, struct.pack("<I", 0xFFFFFFFF) + struct.pack(">I", 0xFFFFFFFF))
    patch_file(iso, ISO_DESCRIPTOR + 128, struct.pack("<H", 0xFFFF) + struct.pack(">H", 0xFFFF))
    image = catalog.get(upload(make_request(unique_name(), path=str(iso), type=ImageType.CDROM)))
    assert image.state is ImageState.READY
    assert image.size == image.virtual_size == iso.stat().st_size


def test_upload_from_worker_path_and_datastore_with_separate_staging_bucket(
        stack_state, cli, add_datastore, catalog, make_request, unique_name, raw_file, staging_leftovers):
    """Staging in another bucket of the same endpoint: a server-side copy, then staging is emptied."""
    ds = unique_name("ds")
    result = add_datastore(ds, "--bucket", f"{ds}-images", "--staging-bucket", f"{ds}-staging", "--prefix", "tenant-a")
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


def test_transient_fault_during_copy_is_retried(stack_state, add_datastore, catalog, make_request, unique_name,
                                                qcow2_file, cuttable_proxy, default_store):
    """The link to S3 is cut for a few seconds while the flow runs: tasks retry, the image ends READY."""
    ds = unique_name("flaky")
    added = add_datastore(ds, "--bucket", f"{ds}-b", endpoint=cuttable_proxy.endpoint)
    assert added.exit_code == 0, added.stderr
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
def test_datastore_add_refusals_change_nothing(stack_state, cli, add_datastore, default_store, unique_name, case):
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

    result = add_datastore(args["name"], "--bucket", f"{ds}-b", *args["extra"], secret=args["secret"])

    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert "not-the-secret" not in result.stderr
    assert json.loads(cli("datastore", "list", "--json").stdout) == listed_before
    assert {b["Name"] for b in default_store.client().list_buckets()["Buckets"]} == buckets_before


def test_datastore_add_takes_its_secret_from_a_file_and_only_from_an_administrator(
        stack_state, cli, default_store, unique_name, tmp_path):
    """No secret on a command line: `--secret-key` does not exist, `--secret-key-file` does. A user
    who is not an administrator is refused with nothing saved and no bucket made."""
    ds = unique_name("ds")
    secret_file = tmp_path / "secret"
    secret_file.write_text(stack_state.s3_secret_key + "\n")
    args = ("datastore", "add", ds, "--endpoint", stack_state.s3_endpoint, "--bucket", f"{ds}-b",
            "--access-key", stack_state.s3_access_key)
    on_the_line = cli(*args, "--secret-key", stack_state.s3_secret_key, user="root")
    assert on_the_line.exit_code == 2 and "No such option: --secret-key" in on_the_line.stderr
    listed_before = json.loads(cli("datastore", "list", "--json").stdout)
    buckets_before = {b["Name"] for b in default_store.client().list_buckets()["Buckets"]}
    by_a_user = cli(*args, "--secret-key-file", secret_file)
    assert by_a_user.exit_code == 1 and "User alice is not an administrator" in by_a_user.stderr
    assert json.loads(cli("datastore", "list", "--json").stdout) == listed_before
    assert {b["Name"] for b in default_store.client().list_buckets()["Buckets"]} == buckets_before
    by_root = cli(*args, "--secret-key-file", secret_file, user="root")
    assert by_root.exit_code == 0, by_root.stderr
    assert load_datastore(ds).secret_key.get_secret_value() == stack_state.s3_secret_key
    assert f"{ds}-b" in {b["Name"] for b in default_store.client().list_buckets()["Buckets"]}


def test_staging_under_a_registered_images_upload_id_is_refused_and_changes_nothing(
        catalog, ready_image, make_request, unique_name, tmp_path, store_objects):
    """A request naming the upload id of a READY image (in its own bucket, its staging key is that
    image's object) with other bytes to stage: refused before a byte is written; the image's
    object, its row and every other row stay as they were."""
    image = ready_image()
    store = load_datastore(image.datastore)
    before_head = store.head(ObjectRef.parse(image.datastore, image.source))
    before = (catalog_snapshot(catalog), store_objects(store))
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(image.size))
    state = upload(make_request(unique_name(), path=str(other), upload_id=image.upload_id), return_state=True)
    assert state.is_failed() and f"already belongs to image {image.id} (READY)" in state.message
    assert store.head(ObjectRef.parse(image.datastore, image.source)) == before_head
    assert (catalog_snapshot(catalog), store_objects(store)) == before


# --- the bytes cross once ------------------------------------------------------------------------

# What reading an object looks like on the wire: a GET of a key, with no query (a listing or a
# multipart call has one).
OBJECT_READS = rb"\AGET /[^?\s]+/[^?\s]+ HTTP/"


def test_an_upload_through_the_api_never_reads_its_bytes_back(cli, new_datastore, cuttable_proxy, catalog,
                                                             unique_name, qcow2_file):
    """The image API inspects and hashes the file as it stages it and records what it found for
    the staged object's ETag; the flow takes that instead of reading the object back. With every
    object read refused by the datastore, the upload still ends READY, with the right sha256,
    format and virtual size, and no read was even tried."""
    ds = new_datastore(cuttable_proxy.endpoint)
    name = unique_name("once")
    cuttable_proxy.deny(OBJECT_READS)
    try:
        result = cli("create", "--name", name, "--path", qcow2_file, "--driver", "qcow2", "--datastore", ds, "--wait")
    finally:
        cuttable_proxy.deny(None)
    assert result.exit_code == 0, result.stderr
    assert cuttable_proxy.denied == 0
    image = next(i for i in catalog.list() if i.name == name)
    assert (image.state, image.format, image.virtual_size) == (ImageState.READY, DiskFormat.QCOW2, 64 * 1024 * 1024)
    assert (image.size, image.sha256) == (qcow2_file.stat().st_size, sha256_of(qcow2_file))


def test_an_inspection_record_holds_only_for_the_object_it_was_made_of(default_store, make_request, unique_name,
                                                                      catalog, raw_file):
    """A recorded inspection whose ETag is not the staged object's (other bytes were put there
    since) is never trusted: the flow reads the object and records what it really is."""
    from catalog.staging import StagedInspection, open_staging

    upload_id = uuid.uuid4().hex
    staged = default_store.staging_ref(upload_id)
    open_staging().record(upload_id=upload_id, datastore="default", bucket=staged.bucket, key=staged.key,
                          owner="alice", group="users")
    with open(raw_file, "rb") as source:
        default_store.upload(source, staged)
    open_staging().record_inspection(upload_id, StagedInspection(
        etag='"not-this-object"', size=raw_file.stat().st_size, sha256="0" * 64, format=DiskFormat.QCOW2,
        detected="qcow2", virtual_size=10 * 1024**3))
    image = catalog.get(upload(make_request(unique_name("stale"), upload_id=upload_id)))
    assert (image.state, image.format, image.virtual_size) == (ImageState.READY, DiskFormat.RAW, raw_file.stat().st_size)
    assert image.sha256 == sha256_of(raw_file)
    assert open_staging().inspection_of(upload_id) is None  # forgotten with its record once adopted
