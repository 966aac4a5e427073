"""A fork server: one process that has loaded Python, Prefect, the flows and the S3 model, and
forks the process of each flow run the image API starts.

A new process pays about 1.5 s of CPU (the interpreter, Prefect's imports, the flows) before it
runs anything. Standby processes hid that from the run that took one, but each run started a
replacement that loaded on the same cores the next operation needed. A fork costs milliseconds
and shares the loaded pages. The forked process is still the run's own: its own session, its pid
recorded as the run's `infrastructure_pid`, killed or cancelled alone, its output in
logs/flow-runs.log.

Protocol, lines on the server's stdin and stdout: the service writes `FLOW_NAME RUN_ID`; the server
answers `started RUN_ID PID`, and `exited PID CODE` when that process ends (CODE as
`subprocess.Popen.returncode`: -N for signal N). The server ends when its input ends; the runs it
forked go on.

Fork safety: the server runs no thread and holds no connection when it forks (a child would
inherit a lock held by a thread that does not exist in it, or share a socket with its siblings);
it loads modules and builds objects only. It checks for threads before every fork.
"""

from __future__ import annotations

import os
import select
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

COMMAND = "--fork-server"


# ----- the service's side -----

class RunProcess:
    """A flow run's process forked by the server: `pid`, and `returncode` once the server reports
    that it ended. Should the server die first, the kernel still says whether the process ended (a
    pidfd), but its code is then unknown (None)."""

    def __init__(self, pid: int, server: "ForkServer"):
        self.pid = pid
        self.returncode: int | None = None
        self.reported = False
        self._server = server
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # cannot be: the server reaps it only after it reported it started
            self._pidfd = None

    def ended(self) -> bool:
        if self.reported:
            return True
        if self._server.reading or self._pidfd is None:
            return False
        return bool(select.select([self._pidfd], [], [], 0)[0])  # the server is gone: ask the kernel

    def wait(self, timeout: float) -> int | None:
        """Its exit code once it ended (None if unknown); TimeoutError if it runs on after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._server.changed:
            while not self.ended():
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"flow-run process {self.pid} still runs after {timeout:g}s")
                self._server.changed.wait(0.2)  # the kernel's answer comes without a notification
        return self.returncode

    def __del__(self):
        if self._pidfd is not None:
            os.close(self._pidfd)


class ForkServer:
    """The service's handle on its fork server process."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env = env
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.fork_server", COMMAND], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=output, env=env, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        self.reading = True
        self.changed = threading.Condition()
        self._started: dict[str, RunProcess] = {}  # by run id, until `start` takes it
        self._running: dict[int, RunProcess] = {}  # by pid (reused only after the server reported the exit)
        threading.Thread(target=self._read_replies, name="hcx-fork-server-replies", daemon=True).start()

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            words = line.decode().split()
            with self.changed:
                if words[0] == "started":
                    self._started[words[1]] = self._running[int(words[2])] = RunProcess(int(words[2]), self)
                elif words[0] == "exited":
                    process = self._running.pop(int(words[1]))
                    process.returncode, process.reported = int(words[2]), True
                self.changed.notify_all()
        with self.changed:
            self.reading = False
            self.changed.notify_all()

    def alive(self) -> bool:
        return self.reading and self.process.poll() is None

    def start(self, flow_name: str, flow_run_id: str, timeout: float = 60.0) -> RunProcess:
        """Fork the process that executes the run (waits while a new server still loads)."""
        try:
            self.process.stdin.write(f"{flow_name} {flow_run_id}\n".encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: closed by `close`
            raise ChildProcessError("the fork server has ended") from None
        with self.changed:
            self.changed.wait_for(lambda: flow_run_id in self._started or not self.reading, timeout)
            process = self._started.pop(flow_run_id, None)
        if process is None:
            raise ChildProcessError(f"the fork server did not start flow run {flow_run_id}")
        return process

    def close(self) -> None:
        """It ends when its input ends (the runs it forked go on)."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass


# ----- the server's side -----

# Imported by every run only once it runs (found by listing sys.modules at a run's end): 70-100 ms.
RUN_TIME_MODULES = (
    "prefect.flow_engine", "prefect.task_engine", "prefect.utilities.visualization", "prefect.concurrency.sync",
    "prefect._internal.states", "anyio._backends._asyncio", "encodings.idna", "rich._emoji_codes",
)


def _preload() -> None:
    """What every run would load or build first, done once (no thread, no socket)."""
    import importlib

    import sqlalchemy

    from blocks.datastore import preload_s3_model
    from blocks.prefect_api import tls_context
    from catalog.settings import get_settings
    from flows.launcher import deployable

    for module in RUN_TIME_MODULES:
        importlib.import_module(module)
    sqlalchemy.engine.make_url(get_settings().catalog_url).get_dialect().import_dbapi()  # the catalog's driver
    deployable()
    tls_context()
    preload_s3_model()


def serve() -> tuple[str, str] | None:
    """Fork a process for each `FLOW_NAME RUN_ID` line read; returns (flow name, run id) in each
    forked process, None in the server when its input ends."""
    import gc

    _preload()
    gc.freeze()  # what is loaded stays shared with the children: their collections do not touch it
    watched = selectors.DefaultSelector()
    watched.register(0, selectors.EVENT_READ)
    pending = b""
    while True:
        for key, _ in watched.select():
            if key.fd != 0:  # a forked process ended
                watched.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(key.data, 0)
                _reply(f"exited {key.data} {os.waitstatus_to_exitcode(status)}")
                continue
            received = os.read(0, 4096)
            if not received:
                return None
            pending += received
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                flow_name, flow_run_id = line.decode().split()
                if threading.active_count() != 1:
                    raise RuntimeError(f"fork server: threads running, refusing to fork: {threading.enumerate()}")
                pid = os.fork()
                if pid == 0:
                    _become_run_process(watched)
                    return flow_name, flow_run_id
                watched.register(os.pidfd_open(pid), selectors.EVENT_READ, data=pid)
                _reply(f"started {flow_run_id} {pid}")


def _reply(line: str) -> None:
    os.write(1, f"{line}\n".encode())


def _become_run_process(watched: selectors.BaseSelector) -> None:
    """(In a forked process.) A session of its own; none of the server's pipes or pidfds."""
    os.setsid()
    for key in list(watched.get_map().values()):
        if key.fd != 0:
            os.close(key.fd)
    watched.close()
    os.dup2(2, 1)  # its output goes to the log, not to the server's reply pipe
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def run_forked(flow_name: str, flow_run_id: str) -> None:
    """(In a forked process.) Execute the run with its clients, as a worker's process would."""
    from prefect.context import SyncClientContext

    from flows.launcher import execute

    with SyncClientContext.get_or_create():
        execute(flow_name, flow_run_id)


if __name__ == "__main__" and sys.argv[1:] == [COMMAND]:
    if (run := serve()) is not None:
        run_forked(*run)
