"""What the issue-10 benchmarks share (bench/upload_vs_raw.py, bench/op_latency.py): an embedded
stack started by the real CLI (`hcx-image up`) in a temporary HCX_HOME, whole processes timed with
their own peak RSS, a 50 ms sampler of the peak RSS of our long-lived processes and their
children, medians and p95, and a description of the machine.

Not a benchmark itself. Nothing here imports the project: the stack is reached through its CLI,
its stack.json and plain HTTP, as an operator would.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HCX = str(BIN / "hcx-image")
MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1000 * 1000

_UNITS = {"": 1, "B": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """`1G`, `256M`, `64MiB`, `1.5G`, `4096` (bytes): binary units, as `hcx-image create --size`."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"not a size: {text!r} (e.g. 1G, 256M, 64MiB)")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def human(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB)):
        if size >= factor:
            value = size / factor
            return f"{value:g} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{size} B"


def machine() -> str:
    """One line: cores, memory, kernel, CPU model, Python; and the load average at the time."""
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({model}), {mem_kib / 1024 / 1024:.1f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}; load average {load}")


def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (of 20 runs: the 19th smallest; of 5: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


# --- whole processes -------------------------------------------------------------------------

@dataclass
class Ran:
    argv: list[str]
    wall: float  # seconds, from spawn to exit
    rc: int
    out: str
    err: str
    maxrss_mib: float  # the process's peak RSS after its exec (VmHWM sampled every 20 ms)

    def check(self) -> "Ran":
        if self.rc != 0:
            raise SystemExit(f"{' '.join(self.argv)} exited {self.rc}:\n{self.out[-3000:]}\n{self.err[-3000:]}")
        return self


def run_timed(argv: list[str], env: dict[str, str], *, timeout: float = 3600, cwd: str | None = None) -> Ran:
    """Run `argv` to its end: its wall time, and its own peak RSS, output kept in files (no pipe
    reader in between). The peak is the VmHWM of the process's image after exec, read every 20 ms
    until it exits: wait4's ru_maxrss would also count the copy of this (larger) process that the
    child was before its exec."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd)
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                values = _status(proc.pid)
                if values:
                    peak[0] = max(peak[0], values.get("VmHWM", 0))
                done.wait(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
            done.set()
        wall = time.perf_counter() - start
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Ran(argv, wall, proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"), peak[0] / 1024)


# --- the embedded stack ----------------------------------------------------------------------

@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    state: dict = field(default_factory=dict)

    def reload(self) -> dict:
        self.state = json.loads((self.home / "stack.json").read_text())
        return self.state

    @property
    def s3_endpoint(self) -> str:  # as cli/stack.py StackState.s3_endpoint builds it
        return f"http://127.0.0.1:{self.state['s3']['ports']['s3.port']}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.state['api']['ports']['port']}"

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def our_pids(self) -> dict[str, int]:
        """Our long-lived processes (the S3 and Prefect servers are not ours and are not counted)."""
        state = self.reload()
        return {name: state[name]["pid"] for name in ("api", "worker") if state.get(name, {}).get("pid")}

    def hcx(self, *args: object, timeout: float = 3600) -> Ran:
        return run_timed([HCX, *map(str, args)], self.env, timeout=timeout, cwd=str(self.home))

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.state["s3_access_key"],
                            aws_secret_access_key=self.state["s3_secret_key"], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without PREFECT_* and HCX_* (tests/conftest.py platform_up does the same),
    pointed at `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HCX_"))}
    env.update(HCX_HOME=str(home), HCX_WORKER_POLL_SECONDS="1", PREFECT_HOME=str(home / "prefect-cli"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def prefect_database(url: str | None) -> dict[str, str]:
    """The stack's extra environment for `--prefect-database-url` (none: the embedded SQLite)."""
    return {"HCX_PREFECT_DATABASE_URL": url} if url else {}


@contextmanager
def embedded_stack(**extra: str) -> Iterator[Stack]:
    """`hcx-image up` in a fresh temporary HCX_HOME; `hcx-image down` and the directory removed after,
    whatever happened."""
    home = Path(tempfile.mkdtemp(prefix="hcx-bench-"))
    stack = Stack(home, stack_env(home, **extra))
    try:
        print(f"starting the embedded stack in {home} ...", file=sys.stderr, flush=True)
        up = stack.hcx("up", timeout=600)
        if up.rc != 0:
            raise SystemExit(f"hcx-image up failed ({up.rc}):\n{up.out[-3000:]}\n{up.err[-3000:]}")
        print(f"  up in {up.wall:.1f} s", file=sys.stderr, flush=True)
        stack.reload()
        yield stack
    finally:
        started = [p for p in _state_pids(home)]
        below = [p for pid in started for p in descendants([pid])]
        try:
            subprocess.run([HCX, "down"], env=stack.env, capture_output=True, timeout=120, cwd=str(home))
        finally:
            for pid in below:  # a flow-run process the services started and `down` left behind
                if _started_in(pid, home):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            shutil.rmtree(home, ignore_errors=True)


def _started_in(pid: int, home: Path) -> bool:
    """Whether `pid` (still) is a process of the stack in `home` (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"HCX_HOME={home}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _state_pids(home: Path) -> list[int]:
    try:
        state = json.loads((home / "stack.json").read_text())
    except (OSError, ValueError):
        return []
    return [state[name]["pid"] for name in ("api", "worker", "prefect", "s3") if state.get(name, {}).get("pid")]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def random_file(path: Path, size: int) -> Path:
    """`size` random bytes (nothing for a server to compress or deduplicate)."""
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            out.write(chunk)
            left -= len(chunk)
    return path


# --- peak RSS of our processes ---------------------------------------------------------------

def descendants(roots: list[int]) -> list[int]:
    """Every process below `roots` (every thread's children: a service may start them from any thread)."""
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid` in KiB ({} once it is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1])
    except OSError:
        return {}
    return values


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds `pid` used so far (with `reaped_children`, also its children that
    ended and were waited for: the flow-run processes of a fork server); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped_children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RssSampler:
    """Every `interval` s, the RSS of our long-lived processes (`roots`: name -> pid) and of every
    process below them. A process that was running when sampling began is judged by its VmRSS
    samples (its VmHWM holds peaks of earlier operations); one that appeared during the window by
    its VmHWM (exact up to its last sample). Use as a context manager around one operation."""

    def __init__(self, roots: dict[str, int], interval: float = 0.05):
        self.roots = roots
        self.interval = interval
        self.peaks_kib: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._before = set(self.roots.values()) | set(descendants(list(self.roots.values())))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # a last look

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        roots = list(self.roots.values())
        for pid in (*roots, *descendants(roots)):
            values = _status(pid)
            if not values:
                continue
            kib = values.get("VmRSS", 0) if pid in self._before else max(values.get("VmHWM", 0), values.get("VmRSS", 0))
            if kib > self.peaks_kib.get(pid, -1):
                self.peaks_kib[pid] = kib
            if pid not in self.labels:
                self.labels[pid] = self._label(pid)

    def _label(self, pid: int) -> str:
        for name, root in self.roots.items():
            if pid == root:
                return name
        cmd = _cmdline(pid)
        if "flows.fork_server" in cmd:  # the server, or a run's process it forked (same command line)
            return "fork server" if _parent(pid) in self.roots.values() else "flow-run process"
        if "flows.launcher" in cmd:
            return "flow-run process"
        return "child: " + (cmd[:60] or str(pid))

    def by_role(self) -> dict[str, float]:
        """Peak RSS in MiB per role (a role with several processes: the largest of them)."""
        roles: dict[str, float] = {}
        for pid, kib in self.peaks_kib.items():
            role = self.labels.get(pid, str(pid))
            roles[role] = max(roles.get(role, 0.0), kib / 1024)
        return roles

    def peak(self) -> float:
        return max(self.peaks_kib.values(), default=0) / 1024
