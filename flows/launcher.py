"""Start an operation's flow run in the background and hand back its id at once.

Local mode: the run is created through the Prefect API, then executed by a detached process of
its own (`python -m flows.launcher`), so the caller can return while the copy goes on. That process
is started ahead of time, a standby that has already loaded Prefect and the flows and waits for its
run on stdin: an operation pays neither the interpreter's start nor the imports (about 1.5 s), and
each run still has a process of its own to supervise, cancel or kill.
Remote mode (HCX_REMOTE=1 or --remote): the run is created on the operation's deployment and a
worker of the process pool executes it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import cache
from pathlib import Path
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
        # Which process runs it, as a worker records it (the standby's command line cannot say).
        client.update_flow_run(run.id, infrastructure_pid=f"{socket.gethostname()}:{process.pid}")
    return str(run.id)


_standbys: list[tuple[dict[str, str], subprocess.Popen]] = []  # each one's environment and process, oldest first
_standby_lock = threading.Lock()


def _launch_environment() -> dict[str, str]:
    settings = get_settings()
    return {**os.environ, **_prefect_client_env(),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.heartbeat_seconds)}


def _start_standby(env: dict[str, str]) -> subprocess.Popen:
    logs = get_settings().home.expanduser() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "flow-runs.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.launcher", STANDBY], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE, env=env, start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
        )


def _keep_standbys(env: dict[str, str]) -> None:
    """(With the lock held.) Settings.standby_executors standbys for `env`: ones started for
    another Prefect API, or that died, are replaced."""
    global _standbys
    for kept_env, process in _standbys:
        if kept_env != env or process.poll() is not None:
            process.stdin.close()  # it ends on end of input
    _standbys = [(kept_env, process) for kept_env, process in _standbys
                 if kept_env == env and process.poll() is None]
    while len(_standbys) < get_settings().standby_executors:
        _standbys.append((env, _start_standby(env)))


def warm_up() -> None:
    """Make sure standbys wait for the next runs (a service calls this when it starts, so that
    even its first operation finds one)."""
    with _standby_lock:
        _keep_standbys(_launch_environment())


def _hand_over(flow_name: str, flow_run_id: str) -> subprocess.Popen:
    """Give the run to the oldest standby (the likeliest to be loaded; no other caller can take
    the same one) and start the next."""
    for _ in range(2):
        with _standby_lock:
            _keep_standbys(_launch_environment())
            _, process = _standbys.pop(0)
        try:
            process.stdin.write(f"{flow_name} {flow_run_id}\n".encode())
            process.stdin.close()
        except BrokenPipeError:  # it died just now: a new one takes the run
            continue
        warm_up()
        return process
    raise HcxError(f"Could not start a process for flow run {flow_run_id}: see logs/flow-runs.log under HCX_HOME.")


def _prefect_client_env() -> dict[str, str]:
    """The Prefect API this process uses, and its auth string (a server behind one answers 401
    without it), for a process that must reach the same API."""
    env = {"PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    if auth := PREFECT_API_AUTH_STRING.value():
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


_launched: dict[str, subprocess.Popen] = {}  # the background processes this process started, by flow run


def crash_if_its_process_died(flow_run_id: str) -> bool:
    """What a worker does for the processes it started, for the ones `submit` started here: a run
    whose process exited before the run ended (killed before it began, say: it sent no heartbeat
    yet, so nothing else would ever end it) is marked CRASHED. True when it was."""
    process = _launched.get(flow_run_id)
    if process is None or process.poll() is None:
        return False
    del _launched[flow_run_id]
    with prefect_client() as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
        if state is not None and state.is_final():
            return False
        log = get_settings().home.expanduser() / "logs" / "flow-runs.log"
        client.set_flow_run_state(UUID(flow_run_id), Crashed(
            message=f"The process running this flow run exited (code {process.returncode}) before the run "
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


STANDBY = "--standby"


def stand_by() -> None:
    """Load what a run needs, then wait for `FLOW_NAME RUN_ID` on stdin and execute that run; end
    quietly on end of input (the service that started this process went away, or took another).
    While it waits it also builds what every run would build first: the Prefect client its run
    uses throughout (its TLS context alone takes 50 ms) and the datastores' S3 clients (botocore
    loads the S3 model for each: 100-150 ms)."""
    from prefect import flow_engine  # noqa: F401  (loaded now, not when a run waits for it)
    from prefect.context import SyncClientContext

    deployable()
    with SyncClientContext.get_or_create():
        _build_datastore_clients()
        words = sys.stdin.readline().split()
        if len(words) == 2:
            execute(*words)


def _build_datastore_clients() -> None:
    """Best effort: a datastore that cannot be reached now gets its client when a run needs it."""
    from blocks.datastore import all_datastores

    try:
        for store in all_datastores().values():
            store.client()
    except Exception as exc:  # noqa: BLE001  (a head start only: the run reports what is wrong)
        print(f"standby: datastore clients not built ahead ({exc.__class__.__name__}: {exc})", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == [STANDBY]:
        stand_by()
    else:
        execute(sys.argv[1], sys.argv[2])
