"""Start an operation's flow run in the background and hand back its id at once.

Local mode: the run is created through the Prefect API, then executed by a detached
`python -m flows.launcher RUN_ID` process (so the CLI can return while the copy goes on).
Remote mode (HCX_REMOTE=1 or --remote): the run is created on the operation's deployment and a
worker of the process pool executes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from catalog.settings import get_settings


def registry() -> dict[str, Flow]:
    """Every operation's flow by name (imported here so a launcher process loads only this)."""
    from flows.upload import upload

    return {"upload": upload}


def submit(flow_name: str, parameters: dict, *, remote: bool | None = None) -> str:
    """Create a flow run of `flow_name` and make sure something executes it; returns its id."""
    remote = get_settings().remote if remote is None else remote
    if remote:
        run = run_deployment(f"{flow_name}/{flow_name}", parameters=parameters, timeout=0)
        return str(run.id)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(registry()[flow_name], parameters=parameters)
    settings = get_settings()
    logs = settings.home.expanduser() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value() or ""}
    with open(logs / "flow-runs.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "flows.launcher", flow_name, str(run.id)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
        )
    return str(run.id)


def execute(flow_name: str, flow_run_id: str) -> None:
    """Run an existing flow run in this process (what a worker would do)."""
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import load_flow_run, run_flow

    with handle_engine_signals(UUID(flow_run_id)):
        flow_run = load_flow_run(flow_run_id=UUID(flow_run_id))
        run_flow(registry()[flow_name], flow_run=flow_run)


if __name__ == "__main__":
    execute(sys.argv[1], sys.argv[2])
