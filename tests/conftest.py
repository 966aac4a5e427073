"""Session-wide real parts: a SeaweedFS on free ports (started by our own stack code), Prefect's
test harness (a real API server), and a SQLite catalog, all under one temporary HCX_HOME."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="hcx-test-"))
# Before anything reads settings (they are cached per process).
os.environ["HCX_HOME"] = str(_SESSION_HOME)
os.environ["HCX_USER"] = "alice"
os.environ["HCX_GROUP"] = "users"
os.environ.pop("HCX_DATABASE_URL", None)
os.environ.pop("HCX_REMOTE", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from blocks.datastore import S3Datastore, load_datastore  # noqa: E402
from catalog.requests import UploadRequest  # noqa: E402
from catalog.settings import get_settings  # noqa: E402
from catalog.store import open_catalog  # noqa: E402
from cli.main import app  # noqa: E402
from cli.runtime import running_platform  # noqa: E402
from cli.stack import Stack, free_port  # noqa: E402


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def stack_state(prefect_api):
    """SeaweedFS started exactly as `hcx-image up` starts it, plus the embedded datastores."""
    stack = Stack(get_settings())
    with running_platform() as state:
        yield state
    stack.down()


@pytest.fixture(scope="session")
def default_store(stack_state) -> S3Datastore:
    return load_datastore("default")


@pytest.fixture
def catalog(stack_state):
    return open_catalog()


@pytest.fixture
def cli(stack_state):
    """Run `hcx-image ...` in this process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture
def unique_name():
    return lambda prefix="img": f"{prefix}-{uuid.uuid4().hex[:8]}"


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
    settings = get_settings()
    return UploadRequest(owner=settings.user, group=settings.group, name=name, **fields)


@pytest.fixture
def make_request():
    return upload_request


# --- fault injection: a TCP proxy that can cut every connection --------------------------------

class CuttableProxy:
    """Forwards 127.0.0.1:port to a target; `cut(seconds)` drops live and new connections."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._down_until = 0.0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = False
        self.refused = 0
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

    def close(self) -> None:
        self._stop = True
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
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

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
