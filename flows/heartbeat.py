"""Flow-run heartbeats that stop at once, so a flow run no longer ends with a ~1 s wait.

Prefect 3.8.8's `flow_engine._send_heartbeats` runs a thread that emits a heartbeat event at the
start of a run and then every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (at least 30), sleeping in
1 s steps; at the end of the run it sets a stop flag and joins the thread, which wakes up only at
the end of its current 1 s sleep. Every flow run therefore paid up to 1 s (measured: an empty flow
run took 1.2 s, 0.1 s of it real work). Heartbeats are what detects a run whose process was killed
(the zombie-run automation of flows/platform.py marks a RUNNING run without a recent heartbeat
CRASHED), so turning them off is no option. This module swaps in the same loop waiting on the stop
event instead of sleeping: the same events at the same times, and the thread ends the moment the
run does.

Installed only where flows run: `flows.launcher.execute` (local runs) and the resolution of a
deployment entrypoint `flows.launcher.<flow>` (a worker's flow-run process), never on import.

Pinned to the Prefect version it was read from: under any other version Prefect's own function
stays in place, and `tests/test_platform_units.py` fails until someone re-reads it. The time it
saves is measured by `bench/flow_run_overhead.py`.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager
from typing import Any, Generator

import prefect
from prefect import flow_engine

PATCHED_PREFECT_VERSION = "3.8.8"
PREFECT_SEND_HEARTBEATS = flow_engine._send_heartbeats  # Prefect's own, kept for comparison


@contextmanager
def _send_heartbeats(engine: Any, join_on_exit: bool = True) -> Generator[None, None, None]:
    """`prefect.flow_engine._send_heartbeats` of 3.8.8 with `stop_event.wait` for the 1 s sleeps."""
    heartbeat_seconds = engine.heartbeat_seconds
    if heartbeat_seconds is None:
        yield
        return
    heartbeat_seconds = max(heartbeat_seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop_event = threading.Event()

    def heartbeat_loop() -> None:
        while not stop_event.is_set():
            if engine.flow_run and engine.flow_run.state and engine.flow_run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            if stop_event.wait(heartbeat_seconds):
                return

    # The thread sees the caller's settings context (and so its PREFECT_API_URL), as in Prefect.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(heartbeat_loop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop_event.set()
        if join_on_exit:
            thread.join(timeout=2)


_send_heartbeats.hcx_patched = True  # type: ignore[attr-defined]


def install() -> bool:
    """Swap the heartbeat context manager in (idempotent); False when Prefect is not the pinned version."""
    if prefect.__version__ != PATCHED_PREFECT_VERSION:
        return False
    flow_engine._send_heartbeats = _send_heartbeats
    return True
