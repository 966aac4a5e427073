"""The image API application: routers, error answers, and the watch over the flow-run processes
this service starts (a run whose process died before it ended is marked CRASHED at once)."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import admin, errors, images, platform, runs, snapshots, uploads, vms
from flows.launcher import crash_runs_whose_process_died, warm_up

log = logging.getLogger("hcx.api")

SUPERVISION_SECONDS = 1.0


def _supervise(stop: threading.Event) -> None:
    while not stop.wait(SUPERVISION_SECONDS):
        try:
            crash_runs_whose_process_died()
        except Exception:  # the Prefect API is away for a moment: look again next time
            log.warning("could not check the flow-run processes", exc_info=True)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    warm_up()  # a process that has loaded Prefect and the flows waits for the first run already
    stop = threading.Event()
    watcher = threading.Thread(target=_supervise, args=(stop,), name="hcx-run-supervisor", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()


def create_app() -> FastAPI:
    app = FastAPI(
        title="hcx-images",
        description="Virtual-machine disk images in S3 datastores. Every request but /health carries an API "
                    "token: `Authorization: Bearer <token>`.",
        version="1",
        lifespan=_lifespan,
    )
    errors.install(app)

    @app.get("/health", tags=["platform"], summary="Answers 200 while the service runs (no token needed)")
    def health() -> dict:
        return {"status": "ok"}

    for module in (images, uploads, runs, admin, platform, vms, snapshots):
        app.include_router(module.router)
    return app
