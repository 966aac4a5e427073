"""Images the service fetches itself: `create --url` (an http(s) URL, through tasks/url_source.py's
checks) and `create --s3` (an S3 object read with a datastore's keys), through the real CLI, image
API, flows and SeaweedFS, from an HTTP server this module starts on loopback. Whatever refuses an
import (an address, a redirect chain, a size, a checksum, a bucket of the service) leaves nothing:
no image, no staged object, no staging record."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

import tasks.objects
from blocks.datastore import S3Datastore
from catalog.model import DiskFormat, ImageState, PermissionDenied
from catalog.requests import UploadRequest
from catalog.settings import get_settings
from catalog.staging import open_staging
from cli.stack import Stack
from flows.upload import upload
from tasks.url_source import UrlPolicy
from tests.conftest import catalog_snapshot, process_environment, write_answer, write_chunked

# conftest.py allows 127.0.0.0/8 (HCX_URL_ALLOW_NETWORKS) for the session's image API and its flow
# runs, so that they reach this module's loopback server; private, link-local and metadata
# addresses stay refused.
LOOPBACK_ALLOWED = '["127.0.0.0/8"]'


# --- an image server on loopback ------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """/files/NAME (with its Content-Length), /chunked/NAME (no length announced), /hops/K/ROUTE/NAME
    (K redirects, then ROUTE), /busy/K/NAME (503 K times, then the file), /cut/NAME (the first
    answer breaks off halfway through the body, then the file)."""

    protocol_version = "HTTP/1.1"
    server: "_ImageServer"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        route, _, rest = self.path.split("?", 1)[0].strip("/").partition("/")  # a query only signs
        if route == "hops":
            left, _, target = rest.partition("/")
            location = f"/hops/{int(left) - 1}/{target}" if int(left) > 1 else f"/{target}"
            return write_answer(self, 302, b"", Location=location)
        if route == "busy":
            times, _, rest = rest.partition("/")
            if self.server.requests.count(self.path) <= int(times):
                return write_answer(self, 503, b"busy")
            route = "files"
        data = self.server.files.get(rest)
        if data is None:
            return write_answer(self, 404, b"")
        if route == "cut" and self.server.requests.count(self.path) == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return None
        if route == "files":
            return write_answer(self, 200, data)
        write_chunked(self, data)


class _ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []

    def publish(self, path: Path, route: str = "files", hops: int = 0) -> str:
        """Serve the file's bytes; the URL that reaches them (after `hops` redirects)."""
        name = uuid.uuid4().hex
        self.files[name] = path.read_bytes()
        start = f"/hops/{hops}/{route}/{name}" if hops else f"/{route}/{name}"
        return f"http://127.0.0.1:{self.server_address[1]}{start}"


@pytest.fixture(scope="module")
def image_server():
    server = _ImageServer()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def tenant_bucket(stack_state, unique_name):
    """A bucket of the tenant's own on the session's S3 (no datastore of the service uses it), and a
    way to put a file there; emptied and removed afterwards."""
    bucket = S3Datastore(endpoint_url=stack_state.s3_endpoint, bucket=unique_name("tenant"),
                         access_key=stack_state.s3_access_key, secret_key=stack_state.s3_secret_key)
    bucket.ensure_buckets()
    yield bucket
    for found in bucket.list_keys(bucket.bucket, ""):
        bucket.delete(bucket.ref(found["Key"]))
    bucket.client().delete_bucket(Bucket=bucket.bucket)


def put_object(store: S3Datastore, path: Path, key: str) -> str:
    with open(path, "rb") as source:
        store.upload(source, store.ref(key))
    return f"s3://{store.bucket}/{key}"


# --- what a test reads back -----------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flow_run_of(output: str) -> str:
    return re.search(r"FLOW RUN: (\S+)", output).group(1)


def upload_id_of(flow_run_id: str) -> str:
    """The staged upload the image API made for an import (a parameter of its flow run)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id)).parameters["request"]["upload_id"]


def named(catalog, name: str) -> list:
    return [image for image in catalog.list() if image.name == name]


def wait_for_settled(client, flow_run_id: str, timeout: float = 120) -> dict:
    """The run's image once it left LOCKED (a run that ended without one fails the test)."""
    deadline = time.monotonic() + timeout
    while (run := client.get(f"/runs/{flow_run_id}").json())["image"] is None or \
            run["image"]["state"] in ("LOCKED", "DELETE"):
        assert not (run["final"] and not run["image_exists"]), run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    return run["image"]


def assert_nothing_left(catalog, store: S3Datastore, staging_leftovers, *, name: str, upload_id: str) -> None:
    """No image, no staged object, no staging record (nor recorded inspection) of the import (into
    the default datastore)."""
    assert named(catalog, name) == [] and catalog.find_by_upload_id(upload_id) is None
    assert not store.exists(store.staging_ref(upload_id))
    assert staging_leftovers(store) == []
    assert open_staging().find(upload_id) is None and open_staging().inspection_of(upload_id) is None
    assert upload_id not in {record.upload_id for record in open_staging().list(datastore="default")}


# --- the environment reaches the service ------------------------------------------------------------

def test_the_image_api_runs_with_loopback_urls_allowed(image_api):
    """What makes the loopback server reachable in this module: the API process's own environment
    (flow runs inherit it), not only this one's."""
    api_pid = Stack(get_settings()).load().api.pid
    assert process_environment(api_pid).get("HCX_URL_ALLOW_NETWORKS") == LOOPBACK_ALLOWED


# --- from a URL -----------------------------------------------------------------------------------

def test_a_url_import_ends_ready_with_the_bytes_sha256_and_size(cli, catalog, image_server, qcow2_file, unique_name,
                                                                default_store, staging_leftovers):
    name = unique_name("url")
    result = cli("create", "--name", name, "--url", image_server.publish(qcow2_file), "--sha256",
                 sha256_of(qcow2_file), "--wait")
    assert result.exit_code == 0, result.stderr
    [image] = named(catalog, name)
    assert (image.state, image.format, image.virtual_size) == (ImageState.READY, DiskFormat.QCOW2, 64 * 1024 * 1024)
    assert (image.size, image.sha256) == (qcow2_file.stat().st_size, sha256_of(qcow2_file))
    assert image.upload_id == upload_id_of(flow_run_of(result.stdout))
    assert open_staging().find(image.upload_id) is None  # adopted where it was staged: forgotten
    assert staging_leftovers(default_store) == []


def test_without_wait_the_cli_answers_with_the_flow_run_at_once(cli, api_as, image_server, raw_file, unique_name):
    """The image exists only once fetched: the CLI does not wait for its id."""
    name = unique_name("url-nowait")
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--url", image_server.publish(raw_file))
    assert result.exit_code == 0, result.stderr
    assert "ID:" not in result.stdout and "registered once the service has fetched" in result.stdout
    image = wait_for_settled(api_as("alice"), flow_run_of(result.stdout))
    assert (image["name"], image["state"]) == (name, "READY")


def test_a_url_import_follows_two_redirects_to_a_body_of_unknown_length(api_as, catalog, image_server, raw_file,
                                                                        unique_name, default_store, staging_leftovers):
    client, name = api_as("alice"), unique_name("hops")
    url = image_server.publish(raw_file, route="chunked", hops=2)
    reply = client.post("/images/import", json={"name": name, "type": "DATABLOCK", "url": url})
    assert reply.status_code == 202, reply.text
    image = wait_for_settled(client, reply.json()["flow_run_id"])
    assert (image["state"], image["size"], image["sha256"]) == ("READY", raw_file.stat().st_size, sha256_of(raw_file))
    hops = [path for path in image_server.requests if path.endswith(url.rsplit("/", 1)[1])]
    assert [path.split("/")[1] for path in hops] == ["hops", "hops", "chunked"]
    assert staging_leftovers(default_store) == []


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/disk.qcow2", "it is a link-local address"),
    ("http://10.20.30.40/disk.raw", "it is a private address"),
])
def test_a_refused_address_fails_the_run_and_leaves_nothing(cli, api_as, catalog, unique_name, default_store,
                                                            staging_leftovers, url, reason):
    """Refused before any packet is sent (HCX_URL_ALLOW_NETWORKS allows loopback only here)."""
    name = unique_name("ssrf")
    result = cli("create", "--name", name, "--url", url, "--wait")
    assert result.exit_code == 1
    assert "Refused to connect" in result.stderr and reason in result.stderr, result.stderr
    flow_run_id = flow_run_of(result.stdout)
    assert api_as("alice").get(f"/runs/{flow_run_id}").json()["state_type"] == "FAILED"
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name, upload_id=upload_id_of(flow_run_id))


def test_an_over_long_redirect_chain_fails_and_leaves_nothing(cli, catalog, image_server, raw_file, unique_name,
                                                              default_store, staging_leftovers):
    name = unique_name("loop")
    result = cli("create", "--name", name, "--url", image_server.publish(raw_file, hops=6), "--wait")
    assert result.exit_code == 1 and "redirected more than 5 times" in result.stderr, result.stderr
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name,
                        upload_id=upload_id_of(flow_run_of(result.stdout)))


@pytest.mark.parametrize("route", ["files", "chunked"])
def test_a_source_over_the_size_limit_fails_and_leaves_nothing(monkeypatch, catalog, image_server, raw_file,
                                                               unique_name, default_store, staging_leftovers, route):
    """The limit is the policy's (S3_MAX_OBJECT in service), made small here for a flow run in this
    process: refused from the announced length before a byte is read, or past it mid-stream."""
    limit = 1024 * 1024
    monkeypatch.setattr(tasks.objects, "url_policy",
                        lambda: UrlPolicy(allow_networks=(ip_network("127.0.0.0/8"),), max_bytes=limit))
    name, upload_id = unique_name("big"), uuid.uuid4().hex
    state = upload(UploadRequest(owner="alice", name=name, url=image_server.publish(raw_file, route=route),
                                 upload_id=upload_id), return_state=True)
    assert state.is_failed() and f"over the {limit}-byte limit" in state.message, state.message
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name, upload_id=upload_id)


@pytest.mark.parametrize("route", ["busy/2", "cut"])
def test_a_source_that_fails_for_a_while_is_fetched_again(catalog, image_server, raw_file, unique_name,
                                                          default_store, staging_leftovers, route):
    """A 503 (twice), or an answer that breaks off halfway: the fetch is retried with backoff and the
    image ends READY with the bytes' sha256, nothing of the broken tries left."""
    name, upload_id = unique_name("flaky"), uuid.uuid4().hex
    url = image_server.publish(raw_file, route=route)
    state = upload(UploadRequest(owner="alice", name=name, url=url, upload_id=upload_id), return_state=True)
    assert state.is_completed(), state.message
    image = catalog.get(state.result())
    assert (image.state, image.sha256) == (ImageState.READY, sha256_of(raw_file))
    path = url.split(str(image_server.server_address[1]), 1)[1]
    assert image_server.requests.count(path) == (3 if route.startswith("busy") else 2)
    assert staging_leftovers(default_store) == []


def test_a_missing_file_is_not_fetched_again(catalog, image_server, unique_name, default_store, staging_leftovers):
    name, upload_id = unique_name("gone"), uuid.uuid4().hex
    url = f"http://127.0.0.1:{image_server.server_address[1]}/files/{uuid.uuid4().hex}"
    state = upload(UploadRequest(owner="alice", name=name, url=url, upload_id=upload_id), return_state=True)
    assert state.is_failed() and "answered HTTP 404" in state.message, state.message
    assert image_server.requests.count(url.split(str(image_server.server_address[1]), 1)[1]) == 1
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name, upload_id=upload_id)


SIGNATURE = "X-Amz-Signature=5ec2e7d0c0ffee"


def _sealed_block_gone(upload_id: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_block_document_by_name(f"hcx-url-{upload_id}", block_type_slug="secret")
        except ObjectNotFound:
            return True
    return False


def test_a_pre_signed_urls_signature_stays_out_of_parameters_catalog_and_messages(cli, catalog, image_server, raw_file,
                                                                                  unique_name):
    """The server is asked for the whole URL; the flow run's parameters, the catalog (image, history,
    the operation it recorded) and the CLI's output hold it without its query, and the Secret block
    that held it while it was fetched is gone."""
    name = unique_name("signed")
    result = cli("create", "--name", name, "--url", f"{image_server.publish(raw_file)}?{SIGNATURE}&X-Amz-Expires=600",
                 "--wait")
    assert result.exit_code == 0, result.stderr
    [image] = named(catalog, name)
    assert (image.state, image.sha256) == (ImageState.READY, sha256_of(raw_file))
    assert any(SIGNATURE in request for request in image_server.requests)
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(UUID(flow_run_of(result.stdout))).parameters
    assert parameters["request"]["url"].endswith("?…") and parameters["request"]["sealed_url"]
    assert SIGNATURE not in repr(parameters) + repr(catalog_snapshot(catalog)) + result.stdout + result.stderr
    assert _sealed_block_gone(image.upload_id)


def test_a_failed_import_of_a_pre_signed_url_keeps_no_credential(cli, catalog, image_server, unique_name):
    name = unique_name("signed-gone")
    missing = f"http://127.0.0.1:{image_server.server_address[1]}/files/{uuid.uuid4().hex}?{SIGNATURE}"
    result = cli("create", "--name", name, "--url", missing, "--wait")
    assert result.exit_code == 1 and "answered HTTP 404" in result.stderr, result.stderr
    assert SIGNATURE not in result.stdout + result.stderr
    assert named(catalog, name) == [] and _sealed_block_gone(upload_id_of(flow_run_of(result.stdout)))


def test_a_wrong_published_checksum_on_a_url_leaves_nothing(cli, catalog, image_server, raw_file, unique_name,
                                                            default_store, staging_leftovers):
    name = unique_name("badsum")
    result = cli("create", "--name", name, "--url", image_server.publish(raw_file), "--sha256", "ab" * 32, "--wait")
    assert result.exit_code == 1 and f"but {'ab' * 32} was given" in result.stderr, result.stderr
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name,
                        upload_id=upload_id_of(flow_run_of(result.stdout)))


def test_the_same_import_sent_again_gets_the_same_flow_run(cli, api_as, catalog, image_server, raw_file, unique_name):
    name = unique_name("again")
    url = image_server.publish(raw_file)
    first = cli("create", "--name", name, "--type", "DATABLOCK", "--url", url, "--wait")
    assert first.exit_code == 0, first.stderr
    again = cli("create", "--name", name, "--type", "DATABLOCK", "--url", url)
    assert again.exit_code == 0, again.stderr
    assert flow_run_of(again.stdout) == flow_run_of(first.stdout)
    assert len(named(catalog, name)) == 1

    client, key = api_as("alice"), uuid.uuid4().hex
    body = {"name": unique_name("again-api"), "type": "DATABLOCK", "url": image_server.publish(raw_file)}
    sent = client.post("/images/import", json=body, headers={"Idempotency-Key": key})
    resent = client.post("/images/import", json=body, headers={"Idempotency-Key": key})
    assert sent.status_code == resent.status_code == 202, (sent.text, resent.text)
    assert resent.json() == {**sent.json(), "repeated": True}
    wait_for_settled(client, sent.json()["flow_run_id"])
    assert len(named(catalog, body["name"])) == 1


def test_malformed_sources_are_refused_before_anything_starts(api_as, cli, catalog, unique_name, raw_file):
    client = api_as("alice")
    before = catalog_snapshot(catalog)
    with_password = client.post("/images/import", json={"name": unique_name(), "url": "https://me:hunter2@host/x"})
    assert with_password.status_code == 422 and "user name or password" in with_password.json()["detail"]
    assert "hunter2" not in with_password.text
    for body, said in (({"url": "ftp://host/x"}, "http:// or https:// URLs only"),
                       ({"s3": "s3://Bucket/"}, "s3://BUCKET/KEY"),
                       ({"url": "http://host/x", "s3": "s3://bucket/x"}, "give one source"),
                       ({"url": "http://host/x", "s3_datastore": "default"}, "with `s3` only")):
        reply = client.post("/images/import", json={"name": unique_name(), **body})
        assert reply.status_code == 422 and said in reply.json()["detail"], reply.text
    both = cli("create", "--name", unique_name(), "--path", raw_file, "--url", "http://host/x")
    assert both.exit_code == 2 and "not --path and --url together" in " ".join(re.findall(r"[\w-]+", both.stderr))
    assert catalog_snapshot(catalog) == before


# --- from an S3 object -------------------------------------------------------------------------------

def test_an_s3_import_from_a_bucket_of_ones_own_ends_ready(cli, catalog, tenant_bucket, raw_file, unique_name,
                                                           default_store, staging_leftovers):
    name = unique_name("s3")
    uri = put_object(tenant_bucket, raw_file, "disks/data.raw")
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--s3", uri, "--sha256", sha256_of(raw_file),
                 "--wait")
    assert result.exit_code == 0, result.stderr
    [image] = named(catalog, name)
    assert (image.state, image.format) == (ImageState.READY, DiskFormat.RAW)
    assert (image.size, image.sha256) == (raw_file.stat().st_size, sha256_of(raw_file))
    assert tenant_bucket.exists(tenant_bucket.ref("disks/data.raw"))  # read, never moved
    assert staging_leftovers(default_store) == []


@pytest.fixture
def object_in_service_bucket(default_store, raw_file):
    """A file put in the default datastore's images bucket (outside its images/ area), removed afterwards."""
    key = f"import-test/{uuid.uuid4().hex}.raw"
    yield put_object(default_store, raw_file, key)
    default_store.delete(default_store.ref(key))


def test_a_non_admin_may_not_import_from_a_bucket_of_the_service(api_as, cli, catalog, object_in_service_bucket,
                                                                 new_datastore, default_store, staging_leftovers,
                                                                 unique_name):
    """Read with the service's keys, such a bucket would hand a tenant other tenants' images: refused
    (403, as any PermissionDenied) naming the rule, whether it holds images or staged uploads."""
    staging_bucket = f"{new_datastore(staging_bucket=True)}-staging"
    client = api_as("alice")
    before = catalog_snapshot(catalog), open_staging().list()
    for uri in (object_in_service_bucket, f"s3://{staging_bucket}/staging/anything"):
        reply = client.post("/images/import", json={"name": unique_name("steal"), "s3": uri})
        assert reply.status_code == 403, reply.text
        assert "only administrators may import from the service's own buckets" in reply.json()["detail"]
    refused = cli("create", "--name", unique_name("steal"), "--s3", object_in_service_bucket)
    assert refused.exit_code == 1 and "may not import from bucket" in refused.stderr
    assert (catalog_snapshot(catalog), open_staging().list()) == before
    assert staging_leftovers(default_store) == []


def test_the_flow_holds_the_bucket_rule_too(catalog, object_in_service_bucket, default_store, staging_leftovers,
                                            unique_name):
    """A run started without the image API (a deployment's REST API) acting as a tenant is refused
    by the task itself, before anything is recorded."""
    name, upload_id = unique_name("steal-flow"), uuid.uuid4().hex
    state = upload(UploadRequest(owner="alice", name=name, s3_uri=object_in_service_bucket, upload_id=upload_id),
                   return_state=True)
    assert state.is_failed()
    with pytest.raises(PermissionDenied, match="only administrators may import"):
        state.result()
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name, upload_id=upload_id)


def test_an_administrator_may_import_from_a_bucket_of_the_service(cli, catalog, object_in_service_bucket, raw_file,
                                                                  unique_name, default_store, staging_leftovers):
    name = unique_name("admin-s3")
    result = cli("create", "--name", name, "--type", "DATABLOCK", "--s3", object_in_service_bucket, "--wait",
                 user="root")
    assert result.exit_code == 0, result.stderr
    [image] = named(catalog, name)
    assert (image.state, image.owner, image.sha256) == (ImageState.READY, "root", sha256_of(raw_file))
    assert staging_leftovers(default_store) == []


def test_a_wrong_published_checksum_on_an_s3_object_leaves_nothing(cli, catalog, tenant_bucket, raw_file, unique_name,
                                                                   default_store, staging_leftovers):
    name = unique_name("s3-badsum")
    uri = put_object(tenant_bucket, raw_file, "data.raw")
    result = cli("create", "--name", name, "--s3", uri, "--md5", "0" * 32, "--wait")
    assert result.exit_code == 1 and f"but {'0' * 32} was given" in result.stderr, result.stderr
    assert_nothing_left(catalog, default_store, staging_leftovers, name=name,
                        upload_id=upload_id_of(flow_run_of(result.stdout)))


def test_a_missing_s3_object_is_refused_at_once(api_as, catalog, tenant_bucket, unique_name):
    before = catalog_snapshot(catalog)
    missing = f"s3://{tenant_bucket.bucket}/nope"
    reply = api_as("alice").post("/images/import", json={"name": unique_name(), "s3": missing})
    assert reply.status_code == 404 and "check the bucket and the key" in reply.json()["detail"], reply.text
    assert catalog_snapshot(catalog) == before
