"""Session-wide real parts: a SeaweedFS on free ports (started by our own stack code), a real
`prefect server` on a PostgreSQL database of its own, and a SQLite catalog, all under one
temporary HCX_HOME; and for the platform modules, `hcx-image up` in homes of their own."""

from __future__ import annotations

import base64
import enum
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="hcx-test-"))
# Before anything reads settings (they are cached per process).
os.environ["HCX_HOME"] = str(_SESSION_HOME)
for _identity in ("HCX_USER", "HCX_GROUP", "HCX_TOKEN", "HCX_API_URL"):  # identity comes from tokens only
    os.environ.pop(_identity, None)
os.environ.pop("HCX_DATABASE_URL", None)
os.environ.pop("HCX_REMOTE", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HCX_URL_ALLOW_NETWORKS"] = '["127.0.0.0/8"]'  # URL imports may reach the tests' loopback servers

import httpx  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from blocks.datastore import S3Datastore, load_datastore  # noqa: E402
from catalog.model import Image, ImageState, ImageType, utcnow  # noqa: E402
from catalog.permissions import Actor  # noqa: E402
from catalog.requests import UploadRequest  # noqa: E402
from catalog.settings import Settings, get_settings  # noqa: E402
from catalog.store import Catalog, open_catalog  # noqa: E402
from catalog.store import images as images_table  # noqa: E402
from cli.main import app  # noqa: E402
from cli.runtime import running_platform  # noqa: E402
from cli.stack import Service, Stack, descendants, free_port  # noqa: E402
from flows.upload import upload  # noqa: E402


# The modules that use the session's `platform` (one `hcx-image up`, ~30 s): sent to one test worker
# together, so that it starts once in the whole run, not once per worker that draws one of them.
SHARED_PLATFORM_MODULES = {"tests/test_platform.py", "tests/test_prefect_auth.py", "tests/test_ui.py",
                           "tests/test_platform_maintenance.py", "tests/test_vms_platform.py"}


def pytest_collection_modifyitems(config, items):
    """The two long units first, one per test worker (with `--no-loadscope-reorder`, as `make test`
    runs): the dead-runs module (its own platform, minutes of waiting on heartbeats) and the
    modules of the shared platform; the others fill in behind them."""
    def rank(item) -> int:
        module = item.nodeid.split("::", 1)[0]
        return 0 if module == "tests/test_platform_deadruns.py" else 1 if module in SHARED_PLATFORM_MODULES else 2

    items.sort(key=rank)  # stable: each module's own order is kept


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, but with the modules sharing the session's platform as one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedPlatformScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "shared-platform" if module in SHARED_PLATFORM_MODULES else module

    return SharedPlatformScheduling(config, log)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real `prefect server` for the session's flows, on a PostgreSQL database of its own.
    (Prefect's test harness keeps its server on SQLite, whose single writer made twenty concurrent
    flows and two test workers wait on "database is locked" for minutes.)"""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    with pg_database("hcx_prefect") as name:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
        with open(home / "server.log", "ab") as log:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + 180
            while not _answers(f"{url}/health"):
                assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
                time.sleep(0.3)
            with temporary_settings(updates={PREFECT_API_URL: url}), \
                    _temporary_global_settings_context(get_settings_context()):  # threads' too, as the harness does
                yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The session's home (S3 data, catalogs, logs: about 0.5 GB a worker) goes once every test
    passed (its stacks are down by then); after a failure it stays, to be read."""
    if exitstatus == 0:
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def stack_state(prefect_api):
    """SeaweedFS started exactly as `hcx-image up` starts it, plus the embedded datastores."""
    stack = Stack(get_settings())
    with running_platform() as state:
        _ensure_session_users()
        yield state
    stack.down()


@pytest.fixture(scope="session")
def default_store(stack_state) -> S3Datastore:
    return load_datastore("default")


@pytest.fixture
def catalog(stack_state):
    return open_catalog()


# The session's users (in the session catalog's directory): alice and carol share the group
# `users`, bob is in `staff`, root is an administrator. Flows resolve request owners here.
SESSION_USERS = {"alice": ["users"], "bob": ["staff"], "carol": ["users"]}


def _ensure_session_users() -> None:
    from catalog.identity import open_directory

    directory = open_directory()
    if not directory.group_exists("staff"):
        directory.add_group("staff")
    for name, groups in SESSION_USERS.items():
        directory.ensure_user(name, groups)
    directory.ensure_user("root", admin=True)


@pytest.fixture(scope="session")
def tokens(stack_state) -> dict[str, str]:
    """An API token for each session user and for the administrator `root`."""
    from catalog.identity import open_directory

    return {name: open_directory().issue_token(name) for name in (*SESSION_USERS, "root")}


@pytest.fixture(scope="session")
def image_api(stack_state, tokens) -> str:
    """The image API started as `hcx-image up` starts it (a process of its own, real HTTP), on the
    session's catalog and Prefect API; its base URL."""
    from prefect.settings import PREFECT_API_URL

    stack = Stack(get_settings())
    state = stack.ensure_api(stack.load(), prefect_api_url=PREFECT_API_URL.value())
    return state.api_url


@pytest.fixture
def api_as(image_api, tokens) -> Callable[[str], httpx.Client]:
    """An HTTP client of the image API with the token of a session user (or `root`)."""
    clients: list[httpx.Client] = []

    def make(user: str) -> httpx.Client:
        client = httpx.Client(base_url=f"{image_api}/api/v1", timeout=60,
                              headers={"Authorization": f"Bearer {tokens[user]}"})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def cli(image_api, tokens):
    """Run `hcx-image ...` in this process as a session user (default alice), a client of the
    session's image API; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args: str, user: str = "alice", env: dict[str, str] | None = None):
        environment = {"HCX_API_URL": image_api, "HCX_TOKEN": tokens[user], **(env or {})}
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=environment)

    return run


@pytest.fixture
def add_datastore(cli, stack_state):
    """`hcx-image datastore add NAME --bucket ... ARGS` as the administrator root, the secret key
    given as an administrator would: in $HCX_DATASTORE_SECRET_KEY, never on the command line."""

    def add(name: str, *args: str, endpoint: str | None = None, secret: str | None = None):
        return cli("datastore", "add", name, "--endpoint", endpoint or stack_state.s3_endpoint,
                   "--access-key", stack_state.s3_access_key, *args, user="root",
                   env={"HCX_DATASTORE_SECRET_KEY": secret or stack_state.s3_secret_key})

    return add


@pytest.fixture
def unique_name():
    return lambda prefix="img": f"{prefix}-{uuid.uuid4().hex[:8]}"


def all_at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls in threads released together (a barrier): a real race. Returns each call's
    result, or the exception it raised, in the order given."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def catalog_snapshot(catalog: Catalog) -> tuple:
    """Everything a refusal must leave as it was: every row and every history row."""
    rows = catalog.list()
    return rows, [catalog.history(i.id) for i in rows]


# --- image files ------------------------------------------------------------------------------

def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def qcow2_file(tmp_path) -> Path:
    """A small qcow2 with real data in it (so its bytes are not all zero)."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 2M", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture
def raw_file(tmp_path) -> Path:
    path = tmp_path / "data.raw"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    return path


# Real ISOs and partitioned disks (xorriso and sgdisk, from apt: scripts/setup.sh), and headers
# patched to lie, all made in the test's temp dir (no binary is committed).
ISO_DESCRIPTOR = 32 * 1024  # the primary volume descriptor follows the 32 KiB system area


def make_iso(path: Path, hybrid: str | None = None) -> Path:
    """An ISO 9660 image made by xorriso. hybrid="mbr": an MBR in its system area, as isohybrid
    writes one; hybrid="gpt": a GPT with an appended EFI partition, as Ubuntu's ISOs are built."""
    tree = path.with_name(f"{path.name}.tree")
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "data.bin").write_bytes(os.urandom(256 * 1024 + 7))
    args = ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(path), "-V", "HCX_TEST"]
    if hybrid == "mbr":
        args += ["--protective-msdos-label"]
    elif hybrid == "gpt":
        efi = path.with_name(f"{path.name}.efi.img")
        efi.write_bytes(bytes(1024 * 1024))
        args += ["-partition_offset", "16", "--mbr-force-bootable", "-append_partition", "2", "0xef", str(efi),
                 "-appended_part_as_gpt"]
    subprocess.run([*args, str(tree)], check=True, capture_output=True)
    return path


def make_gpt_disk(path: Path, size: str = "16M") -> Path:
    """A raw disk with a GPT (and its protective MBR) and one partition, made by sgdisk."""
    qemu_img("create", "-q", "-f", "raw", str(path), size)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:8300", str(path)], check=True, capture_output=True)
    return path


def patch_file(path: Path, offset: int, data: bytes) -> Path:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def make_qcow2_claiming(path: Path, virtual_size: int) -> Path:
    """A real qemu-img qcow2 whose header's size field (offset 24, big-endian u64) is patched."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    return patch_file(path, 24, struct.pack(">Q", virtual_size))


def hide_qcow2_in(path: Path, qcow2: Path) -> Path:
    """Put a qcow2 header in the first 440 bytes of `path` (an MBR's boot code area, before its
    partition table): the bytes now match qcow2 too."""
    return patch_file(path, 0, qcow2.read_bytes()[:440])


# --- what must stay empty ---------------------------------------------------------------------

def leftover_staging(store: S3Datastore) -> list[str]:
    """Staged objects no image points at, and incomplete multipart uploads, in the staging area."""
    bucket, prefix = store.staging_area()
    sources = {i.source for i in open_catalog().list() if i.source}
    leftovers = [f"s3://{bucket}/{o['Key']}" for o in store.list_keys(bucket, prefix)]
    leftovers = [uri for uri in leftovers if uri not in sources]
    leftovers += [f"multipart:{u['Key']}" for u in store.list_multipart_uploads(bucket, prefix)]
    return leftovers


@pytest.fixture
def staging_leftovers():
    return leftover_staging


def upload_request(name: str, **fields) -> UploadRequest:
    """An upload as the image API would send it for alice (the session's default user)."""
    return UploadRequest(owner=fields.pop("owner", "alice"), name=name, **fields)


@pytest.fixture
def make_request():
    return upload_request


# --- HTTP servers the tests start (URL imports) ---------------------------------------------------

def write_answer(handler, code: int, body: bytes, **headers: str) -> None:
    """Answer `code` with `body` and its Content-Length (and `headers`)."""
    handler.send_response(code)
    for name, value in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def write_chunked(handler, body: bytes, chunk: int = 65536) -> None:
    """Answer 200 with `body` in chunked transfer encoding: a body of unknown length."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    handler.wfile.write(b"0\r\n\r\n")


# --- fault injection: a TCP proxy that can cut every connection --------------------------------

# What S3 answers a request it refuses: a real 403, which clients do not retry.
_ACCESS_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                       b'<Message>Access Denied (injected by the test proxy)</Message></Error>')
_ACCESS_DENIED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(_ACCESS_DENIED_BODY), _ACCESS_DENIED_BODY))
DENY_SERVER_COPIES = rb"(?i)\r\nx-amz-copy-source:"
DENY_DELETES = rb"\ADELETE "


class CuttableProxy:
    """Forwards 127.0.0.1:port to a target; `cut(seconds)` drops live and new connections;
    `deny(pattern)` answers every request whose bytes match with S3's 403 AccessDenied (a fault not
    worth retrying: e.g. DENY_SERVER_COPIES, DENY_DELETES) until `deny(None)`."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._deny: re.Pattern | None = None
        self._hold: re.Pattern | None = None
        self._held = threading.Event()
        self.holding = 0
        self.denied = 0
        self._down_until = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = False
        self.refused = 0
        self.forwarded = 0  # bytes client -> server
        self._cut_at: tuple[int, float] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def cut_after(self, forwarded: int, seconds: float) -> None:
        """`cut(seconds)` once `forwarded` bytes more went from clients to the server."""
        self._cut_at = (self.forwarded + forwarded, seconds)

    def deny(self, pattern: bytes | None) -> None:
        self._deny = re.compile(pattern) if pattern else None

    def hold(self, pattern: bytes | None) -> None:
        """Requests whose bytes match are held unanswered (the client waits, as on a stalled
        server) until `hold(None)`, which drops their connections."""
        if pattern:
            self._held.clear()
            self._hold = re.compile(pattern)
        else:
            self._hold = None
            self._held.set()

    def close(self) -> None:
        self._stop = True
        self._held.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            if time.monotonic() < self._down_until:
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> server, answering a denied request itself (a request's head arrives whole:
        the client sends it at once, after the previous response on the connection)."""
        try:
            while data := client.recv(65536):
                hold = self._hold
                if hold is not None and hold.search(data):
                    self.holding += 1
                    self._held.wait()
                    break
                deny = self._deny
                if deny is not None and deny.search(data):
                    self.denied += 1
                    client.sendall(_ACCESS_DENIED)
                    break
                upstream.sendall(data)
                self.forwarded += len(data)
                if self._cut_at is not None and self.forwarded >= self._cut_at[0]:
                    seconds, self._cut_at = self._cut_at[1], None
                    self.cut(seconds)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def cuttable_proxy(stack_state):
    proxy = CuttableProxy(stack_state.s3.ports["s3.port"])
    yield proxy
    proxy.close()


# --- the lifecycle: datastores, images in any state, actors -----------------------------------

ALICE = Actor(user="alice", group="users")  # the CLI's user in this session (its token's)
BOB = Actor(user="bob", group="staff")
ADMIN = Actor(user="root", group="oneadmin", is_admin=True)


@pytest.fixture
def new_datastore(stack_state, unique_name):
    """Register a datastore block on the session's SeaweedFS (or a proxy to it: `endpoint`), with
    its buckets; returns its name."""

    def make(endpoint: str | None = None, *, limit_bytes: int | None = None, staging_bucket: bool = False) -> str:
        name = unique_name("ds")
        store = S3Datastore(endpoint_url=endpoint or stack_state.s3_endpoint, bucket=f"{name}-images",
                            staging_bucket=f"{name}-staging" if staging_bucket else None, limit_bytes=limit_bytes,
                            access_key=stack_state.s3_access_key, secret_key=stack_state.s3_secret_key)
        store.ensure_buckets()
        store.save(name)
        return name

    return make


@pytest.fixture
def far_endpoint(stack_state) -> str:
    """The same SeaweedFS spelled differently: hcx treats it as another endpoint (copies stream)."""
    return stack_state.s3_endpoint.replace("127.0.0.1", "localhost")


@pytest.fixture
def ready_image(tmp_path, make_request, unique_name, catalog):
    """A READY image uploaded by the real upload flow from a file of random bytes."""

    def make(*, datastore: str = "default", size: int = 3 * 1024 * 1024 + 5, persistent: bool = False,
             type_: ImageType = ImageType.DATABLOCK) -> Image:
        path = tmp_path / f"{uuid.uuid4().hex}.raw"
        path.write_bytes(os.urandom(size))
        image_id = upload(make_request(unique_name("src"), path=str(path), datastore=datastore,
                                       persistent=persistent, type=type_))
        image = catalog.get(image_id)
        assert image.state is ImageState.READY, image.error
        return image

    return make


@pytest.fixture(scope="session")
def shared_source(stack_state, tmp_path_factory) -> Image:
    """One READY image for the whole session, uploaded by the real flow; tests may clone it (a clone
    leaves it READY again) or be refused, never change it otherwise."""
    path = tmp_path_factory.mktemp("shared") / "shared.raw"
    path.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    image_id = upload(upload_request(f"shared-{uuid.uuid4().hex[:8]}", path=str(path), type=ImageType.DATABLOCK))
    image = open_catalog().get(image_id)
    assert image.state is ImageState.READY, image.error
    return image


@pytest.fixture
def put_image(catalog, unique_name):
    """Insert an image row in any state with any counters, bypassing the rules (for the state
    matrix, which tests the rules and operations, not the flows). A DELETE row holds no name."""

    def make(state: ImageState, **fields) -> Image:
        name = fields.pop("name", None) or unique_name("row")
        now = utcnow()
        values = {
            "name": name, "name_slot": None if state is ImageState.DELETE else name,
            "owner": "alice", "group": "users", "permissions": 0o600, "type": ImageType.OS.value,
            "persistent": False, "bus": "virtio", "format": "raw", "datastore": "default",
            "state": state.value, "description": "", "attributes": {}, "size": 1024, "virtual_size": 1024,
            "running_vms": 0, "cloning_ops": 0, "snapshots": 0, "version": 0,
            "created_at": now, "updated_at": now, "upload_id": uuid.uuid4().hex,
        }
        values.update(source=f"s3://hcx-images/images/{values['upload_id']}", source_etag='"etag"')  # bytes "in place"
        values.update({k: (v.value if isinstance(v, enum.Enum) else v) for k, v in fields.items()})
        with catalog.engine.begin() as conn:
            image_id = conn.execute(images_table.insert().values(**values)).inserted_primary_key[0]
        return catalog.get(image_id)

    return make


def register_image(catalog: Catalog, name: str, *, actor: Actor | None = None, state: ImageState = ImageState.READY,
                   datastore: str = "default", limit_bytes: int | None = None, run_id: str | None = None,
                   **fields) -> Image:
    """A new image through the catalog's one insert path (rules, invariants, capacity lock), as a
    flow registers it; a READY one records an object, as the lifecycle demands."""
    from catalog import operations, rules
    from catalog.model import Bus, DiskFormat

    upload_id = fields.pop("upload_id", None) or uuid.uuid4().hex
    if state is not ImageState.LOCKED:
        fields.setdefault("source", f"s3://hcx-images/images/{upload_id}")
        fields.setdefault("source_etag", '"etag"')
    image = rules.new_image(actor=actor or ALICE, name=name, type_=fields.pop("type_", ImageType.OS),
                            persistent=fields.pop("persistent", False), bus=Bus.VIRTIO,
                            format_=fields.pop("format_", DiskFormat.QCOW2), datastore=datastore, run_id=run_id,
                            upload_id=upload_id, state=state, **fields)
    return operations.register(catalog, image, message="registered by a test", limit_bytes=limit_bytes)


def object_keys(store: S3Datastore) -> list[str]:
    """Every object of a datastore's image area and staging area."""
    bucket, prefix = store.staging_area()
    keys = {f"{store.bucket}/{o['Key']}" for o in store.list_keys(store.bucket, store.prefix)}
    keys |= {f"{bucket}/{o['Key']}" for o in store.list_keys(bucket, prefix)}
    return sorted(keys)


@pytest.fixture
def store_objects():
    return object_keys


def flow_run_artifacts(flow_run_id) -> list:
    """The artifacts attached to a flow run of the session's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def recent_events(name: str, resource_id: str, timeout: float = 20) -> list:
    """The events `name` about `resource_id` of the last ten minutes, once there are some (events
    reach the API shortly after they are emitted); [] after `timeout` seconds without any."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            found = client.read_events(EventFilter(
                occurred=EventOccurredFilter(since=datetime.now(timezone.utc) - timedelta(minutes=10)),
                event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]),
            ), limit=50).events
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# --- the platform: `hcx-image up` in a home of its own (SeaweedFS, prefect server + UI, worker) -

HCX_CLI = str(Path(sys.executable).with_name("hcx-image"))
REPO_ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class AskAgainWhenUnavailable(httpx.HTTPTransport):
    """A 503 from the embedded server (its SQLite was locked by a concurrent write) is asked again
    after a pause, as Prefect's own client does; so is a read or a PATCH that timed out while the
    two test workers load the machine (both are idempotent)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(5):
            try:
                response = super().handle_request(request)
            except httpx.TimeoutException:
                if request.method not in ("GET", "PATCH") and not request.url.path.endswith("/filter"):
                    raise
                continue
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(1 + attempt)
        return super().handle_request(request)


class Platform:
    """A running platform started by the real CLI, and ways in: its CLI, REST API, catalog, SDK."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home = home
        self.env = env
        self.settings = Settings(home=home)
        self.stack = Stack(self.settings)
        self.catalog = Catalog(self.settings.catalog_url)

    @property
    def state(self):
        return self.stack.load()

    @property
    def api_url(self) -> str:
        return f"{self.state.prefect_url}/api"

    @property
    def ui_url(self) -> str:
        return self.state.prefect_url

    def hcx(self, *args, timeout: float = 180, **env) -> subprocess.CompletedProcess:
        """`hcx-image ...` as a user would run it against this platform."""
        return subprocess.run([HCX_CLI, *map(str, args)], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout, cwd=self.home)

    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30, transport=AskAgainWhenUnavailable(),
                            headers=self.stack.prefect_headers(self.api_url))

    @contextmanager
    def sdk(self):
        """This process's Prefect client (blocks, SDK calls) pointed at the platform's API."""
        from prefect.events.worker import EventsWorker
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url,
                                         PREFECT_API_AUTH_STRING: self.stack.auth_string()}):
            try:
                yield
            finally:  # its events (block loads) go to this API, and later ones to the next
                EventsWorker.drain_all(timeout=5, at_exit=False)

    def datastore(self, name: str = "default") -> S3Datastore:
        with self.sdk():
            return S3Datastore.load(name, _sync=True)

    def deployment_id(self, name: str) -> str:
        with self.rest() as api:
            return api.get(f"/deployments/name/{name}/{name}").raise_for_status().json()["id"]

    def create_run(self, deployment: str, parameters: dict) -> httpx.Response:
        """`POST /api/deployments/{id}/create_flow_run`, as any REST client would."""
        with self.rest() as api:
            return api.post(f"/deployments/{self.deployment_id(deployment)}/create_flow_run",
                            json={"parameters": parameters})

    def flow_run(self, flow_run_id: str) -> dict:
        with self.rest() as api:
            return api.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()

    def wait_run(self, flow_run_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(flow_run_id)
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(0.3)
        raise AssertionError(f"flow run {flow_run_id} still {run['state_type']} after {timeout}s")

    def artifacts(self, flow_run_id: str) -> list[dict]:
        with self.rest() as api:
            return api.post("/artifacts/filter", json={
                "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).raise_for_status().json()

    def events(self, prefix: str, resource_id: str | None = None, since: float = 900) -> list[dict]:
        """Events whose name starts with `prefix` (all pages), oldest first."""
        query: dict = {"event": {"prefix": [prefix]}, "order": "ASC", "occurred": {
            "since": (datetime.now(timezone.utc) - timedelta(seconds=since)).isoformat()}}
        if resource_id:
            query["resource"] = {"id": [resource_id]}
        found: list[dict] = []
        with self.rest() as api:
            page = api.post("/events/filter", json={"limit": 50, "filter": query}).raise_for_status().json()
            found += page["events"]
            while page.get("next_page"):
                page = api.get(page["next_page"]).raise_for_status().json()
                found += page["events"]
        return found

    def wait_for_events(self, prefix: str, resource_id: str, count: int = 1, timeout: float = 30) -> list[dict]:
        """The events once at least `count` arrived (the server stores them a moment after)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events(prefix, resource_id)) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return found

    def logs(self, flow_run_id: str) -> list[dict]:
        with self.rest() as api:
            return api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                  "limit": 200}).raise_for_status().json()

    def add_datastore(self, name: str, **fields) -> S3Datastore:
        """A datastore block on the platform's S3 (as `hcx-image datastore add` saves it)."""
        state = self.state
        store = S3Datastore(endpoint_url=state.s3_endpoint, access_key=state.s3_access_key,
                            secret_key=state.s3_secret_key, **fields)
        with self.sdk():
            store.ensure_buckets()
            store.save(name)
        return self.datastore(name)

    def stage(self, path: Path, datastore: str = "default") -> str:
        """Put a file into a datastore's staging area as an external tool would; its upload id."""
        store = self.datastore(datastore)
        upload_id = uuid.uuid4().hex
        with open(path, "rb") as source:
            store.upload(source, store.staging_ref(upload_id))
        return upload_id

    def pids(self) -> list[int]:
        state = self.state
        return [pid for pid in (state.s3.pid, state.prefect.pid, state.worker.pid, state.api.pid) if pid]


def basic_auth(secret: str) -> dict[str, str]:
    """The header Prefect's client sends for an auth string (written out here, not taken from the
    code under test)."""
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def prefect_rest(platform: Platform, headers: dict[str, str] | None = None) -> httpx.Client:
    """A plain REST client of the platform's Prefect API, sending `headers` (none: no credentials);
    it asks again when the server's SQLite is busy (503), as Prefect's own client does."""
    return httpx.Client(base_url=platform.api_url, headers=headers or {}, timeout=30,
                        transport=AskAgainWhenUnavailable())


def proc_file(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # ended meanwhile
        return b""


def process_environment(pid: int) -> dict[str, str]:
    entries = proc_file(pid, "environ").decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


@contextmanager
def platform_up(home: Path, **settings: str):
    """`hcx-image up` in `home` on free ports, with extra environment `settings` (HCX_*, PREFECT_*);
    `hcx-image down` after, and nothing it started may outlive it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HCX_"))}
    env.update(HCX_HOME=str(home), HCX_WORKER_POLL_SECONDS="1",
               PREFECT_HOME=str(home / "prefect-cli"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **settings)
    started = Platform(home, env)
    result = started.hcx("up", timeout=300)
    try:
        assert result.returncode == 0, f"hcx-image up failed:\n{result.stdout}\n{result.stderr}"
        yield started
    finally:
        pids = started.pids()
        below = [p for pid in pids for p in descendants(pid)]
        down = started.hcx("down")
        assert down.returncode == 0, down.stderr
        left = [pid for pid in (*pids, *below) if Stack.running(Service(pid=pid))]
        assert left == [], f"processes left running after `hcx-image down`: {left}"


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Platform:
    """`hcx-image up` once per session in its own home and free ports (see `platform_up`), its
    Prefect server on a PostgreSQL database of its own (HCX_PREFECT_DATABASE_URL), as an operator
    runs it at scale; the dead-runs module's platform keeps the embedded SQLite default."""
    with pg_database("hcx_platform") as name, \
            platform_up(tmp_path_factory.mktemp("platform"),
                        HCX_PREFECT_DATABASE_URL=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}") as started:
        yield started


@pytest.fixture(scope="session")
def finished_upload(platform, tmp_path_factory) -> dict:
    """One upload through the deployment's REST API, run by the worker to the end, as an operator
    holding the auth string would start it (no owner: it acts as the administrator oneadmin):
    {"flow_run": <run>, "image": Image, "name": str}."""
    source = tmp_path_factory.mktemp("upload") / "disk.raw"
    source.write_bytes(os.urandom(6 * 1024 * 1024 + 17))
    upload_id = platform.stage(source)
    name = f"rest-{upload_id[:8]}"
    reply = platform.create_run("upload", {"request": {"name": name, "type": "DATABLOCK", "upload_id": upload_id}})
    assert reply.status_code == 201, reply.text
    run = platform.wait_run(reply.json()["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    return {"flow_run": run, "image": platform.catalog.find_by_upload_id(upload_id), "name": name,
            "source": source}


# --- a real browser: Debian's chromium driven by playwright (never `playwright install`) ------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page():
    """One headless Chromium page per module (`apt-get install chromium`, `pip install playwright`).
    Never longer: playwright's sync API keeps an event loop running in the main thread, under
    which Prefect's sync calls (`Block.save`) would turn into coroutines nobody awaits."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make setup does)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `pip install -e '.[test]'` (make setup does)")
    expect.set_options(timeout=15_000)  # the UI is a single-page app: wait on content, not on load
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


# --- PostgreSQL: on every machine of this project and in CI; missing it fails, never skips -----

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def pg_database(prefix: str):
    """A fresh PostgreSQL database (its name), dropped afterwards."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL does not answer on 127.0.0.1:5432 ({exc.__class__.__name__}): start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_catalog():
    """A catalog in a fresh PostgreSQL database, dropped afterwards."""
    with pg_database("hcx_test") as name:
        catalog = Catalog(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
        try:
            yield catalog
        finally:
            catalog.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_catalog(request, tmp_path):
    """An empty catalog of its own, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    else:
        yield request.getfixturevalue("pg_catalog")


