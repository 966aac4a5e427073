"""Start an operation's flow run in the background and hand back its id at once.

Local mode: the run is created through the Prefect API, then executed by a detached process of
its own, so the caller can return while the copy goes on. That process is forked by a fork server
(flows/fork_server.py) that has already loaded Prefect and the flows: an operation pays neither the
interpreter's start nor the imports (about 1.5 s of CPU), and each run still has a process of its
own to supervise, cancel or kill.
Remote mode (HCX_REMOTE=1 or --remote): the run is created on the operation's deployment and a
worker of the process pool executes it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from functools import cache
from uuid import UUID

from prefect import Flow
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL
from prefect.states import Cancelled, Crashed

from blocks.prefect_api import prefect_client
from catalog.model import HcxError
from catalog.settings import get_settings
from flows import heartbeat
from flows.fork_server import ForkServer, RunProcess


def registry() -> dict[str, Flow]:
    """Every operation's flow by name (imported here so a launcher process loads only this)."""
    from flows.clone import clone
    from flows.create_empty import create_empty
    from flows.delete import delete
    from flows.retry import retry
    from flows.snapshot import snapshot_create, snapshot_delete, snapshot_flatten, snapshot_revert
    from flows.upload import upload
    from flows.vm_epilog import vm_epilog
    from flows.vm_prolog import vm_prolog

    return {"upload": upload, "clone": clone, "create-empty": create_empty, "delete": delete, "retry": retry,
            "vm-prolog": vm_prolog, "vm-epilog": vm_epilog,
            "snapshot-create": snapshot_create, "snapshot-revert": snapshot_revert,
            "snapshot-delete": snapshot_delete, "snapshot-flatten": snapshot_flatten}


def maintenance() -> dict[str, Flow]:
    """The scheduled flows that keep the catalog and the datastores in step."""
    from flows.monitor import monitor
    from flows.reconcile import reconcile
    from flows.scrub import scrub

    return {"reconcile": reconcile, "monitor": monitor, "scrub": scrub}


@cache
def deployable() -> dict[str, Flow]:
    """Every flow that gets a deployment, by deployment name, with the shared reporting hooks
    (events, artifacts). Runs are created from these, locally and by the worker alike."""
    from flows.reporting import with_reporting

    return {name: with_reporting(flow) for name, flow in {**registry(), **maintenance()}.items()}


def entrypoint(name: str) -> str:
    """The deployment entrypoint of `name`: a module path resolved by this module's __getattr__."""
    return f"{__name__}.{name.replace('-', '_')}"


def __getattr__(attribute: str) -> Flow:
    """`flows.launcher.upload` is the upload flow with its reporting hooks (deployment entrypoints).
    A worker's flow-run process resolves its deployment's entrypoint here before it runs the flow:
    that process runs flows, so it gets the heartbeat change."""
    for name, flow in deployable().items():
        if name.replace("-", "_") == attribute:
            heartbeat.install()
            return flow
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


_remote_choice: bool | None = None  # the CLI's --remote/--local, for this invocation


def use_remote(remote: bool | None) -> None:
    """Send the next operations through the deployments (True), run them here (False), or follow
    HCX_REMOTE (None)."""
    global _remote_choice
    _remote_choice = remote


def remote_mode() -> bool:
    return get_settings().remote if _remote_choice is None else _remote_choice


def submit(flow_name: str, parameters: dict, *, remote: bool | None = None) -> str:
    """Create a flow run of `flow_name` and make sure something executes it; returns its id."""
    remote = remote_mode() if remote is None else remote
    flow = deployable()[flow_name]
    if remote:
        try:
            run = run_deployment(f"{flow.name}/{flow_name}", parameters=parameters, timeout=0)
        except ObjectNotFound:
            raise HcxError(
                f"Deployment {flow.name}/{flow_name} does not exist on {PREFECT_API_URL.value()}: "
                "`hcx-image up` (or `prefect deploy --all` from the repository) creates the deployments."
            ) from None
        return str(run.id)
    with prefect_client() as client:
        run = client.create_flow_run(flow, parameters=parameters)
        process = _launched[str(run.id)] = _hand_over(flow_name, str(run.id))
        # Which process runs it, as a worker records it (its command line, the fork server's, cannot say).
        client.update_flow_run(run.id, infrastructure_pid=f"{socket.gethostname()}:{process.pid}")
    return str(run.id)


_fork_server: ForkServer | None = None  # the process that forks each run's process
_fork_server_lock = threading.Lock()


def _launch_environment() -> dict[str, str]:
    settings = get_settings()
    return {**os.environ, **_prefect_client_env(),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_seconds)}


def _running_fork_server() -> ForkServer:
    """(With the lock held.) The fork server for this process's Prefect API: one started for another
    API, or that ended, is replaced."""
    global _fork_server
    env = _launch_environment()
    if _fork_server is None or _fork_server.env != env or not _fork_server.alive():
        if _fork_server is not None:
            _fork_server.close()
        logs = get_settings().home.expanduser() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _fork_server = ForkServer(env, logs / "flow-runs.log")
    return _fork_server


def warm_up() -> None:
    """Start the fork server now (a service calls this when it starts, so that even its first
    operation finds it loaded)."""
    with _fork_server_lock:
        _running_fork_server()


def _hand_over(flow_name: str, flow_run_id: str) -> RunProcess:
    """Have the fork server start the run's process (a new server, should it have just ended)."""
    for _ in range(2):
        with _fork_server_lock:
            server = _running_fork_server()
            try:
                return server.start(flow_name, flow_run_id)
            except ChildProcessError:  # ended, or no answer: killed, so that it cannot fork the run late
                server.process.kill()
    raise HcxError(f"Could not start a process for flow run {flow_run_id}: see logs/flow-runs.log under HCX_HOME.")


def _prefect_client_env() -> dict[str, str]:
    """The Prefect API this process uses, and its auth string (a server behind one answers 401
    without it), for a process that must reach the same API."""
    env = {"PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    if auth := PREFECT_API_AUTH_STRING.value():
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


_launched: dict[str, RunProcess] = {}  # the background processes this process started, by flow run


def crash_if_its_process_died(flow_run_id: str) -> bool:
    """What a worker does for the processes it started, for the ones `submit` started here: a run
    whose process exited before the run ended (killed before it began, say: it sent no heartbeat
    yet, so nothing else would ever end it) is marked CRASHED. True when it was."""
    process = _launched.get(flow_run_id)
    if process is None or not process.ended():
        return False
    del _launched[flow_run_id]
    with prefect_client() as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
        if state is not None and state.is_final():
            return False
        log = get_settings().home.expanduser() / "logs" / "flow-runs.log"
        code = "unknown" if process.returncode is None else process.returncode
        client.set_flow_run_state(UUID(flow_run_id), Crashed(
            message=f"The process running this flow run exited (code {code}) before the run "
                    f"ended; its output is in {log}."), force=True)
    return True


def crash_runs_whose_process_died() -> list[str]:
    """`crash_if_its_process_died` for every run this process launched (a service calls it
    periodically, as a worker watches its processes); the ids of the runs it marked CRASHED."""
    return [run_id for run_id in list(_launched) if crash_if_its_process_died(run_id)]


def execute(flow_name: str, flow_run_id: str) -> None:
    """Run an existing flow run in this process (what a worker would do)."""
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import load_flow_run, run_flow

    heartbeat.install()
    _stop_when_cancelled(flow_run_id)
    with handle_engine_signals(UUID(flow_run_id)):
        flow_run = load_flow_run(flow_run_id=UUID(flow_run_id))
        run_flow(deployable()[flow_name], flow_run=flow_run)


def _stop_when_cancelled(flow_run_id: str, every: float = 2.0, grace: float = 10.0) -> None:
    """What a worker does for the runs it supervises, for this unsupervised process: when the run
    is set CANCELLING (a forced delete superseded it), SIGTERM, which the flow engine turns into a
    final state (its hooks run, fenced: they change nothing); a run still going after `grace`
    (stuck in a transfer that waits on its threads) is marked CANCELLED and the process ends."""

    def state_now():
        with prefect_client() as client:
            return client.read_flow_run(UUID(flow_run_id)).state

    def watch() -> None:
        while True:
            time.sleep(every)
            try:
                state = state_now()
            except Exception:  # the API is away for a moment: ask again
                continue
            if state is not None and state.is_final():
                return
            if state is not None and state.is_cancelling():
                break
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        with prefect_client() as client:
            client.set_flow_run_state(UUID(flow_run_id), Cancelled(
                message=f"Cancelled: the process did not end within {grace:g}s of SIGTERM and was stopped."),
                force=True)
        os._exit(1)

    threading.Thread(target=watch, name="hcx-cancel-watch", daemon=True).start()
