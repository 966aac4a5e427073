"""Flow-run state hooks: turn a run's outcome into a catalog transition.

Hooks are not guaranteed to run (a killed worker runs none), so every step they take is
idempotent and the scheduled reconcile flow is the backstop. Every write is fenced by the run:
the hook of a run that was superseded (a retry or a forced delete took its image over) changes
nothing.
"""

from __future__ import annotations

import logging
from typing import Callable

from prefect import Flow, flow

from catalog import rules
from catalog.model import HcxError, Image, Superseded
from catalog.store import open_catalog

log = logging.getLogger("hcx.hooks")


def failure_exception(state) -> BaseException | None:
    """The exception a failed run ended with, when it can still be read."""
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # the result itself may be unreadable after a crash
        return None
    return result if isinstance(result, BaseException) else None


def failure_reason(state) -> str:
    """The error a failed/crashed/cancelled run ended with, as a user should read it."""
    exc = failure_exception(state)
    if exc is not None:
        return str(exc) or type(exc).__name__
    return state.message or state.name


def owns(image: Image | None, flow_run_id: str) -> bool:
    """Whether this run is (still) the one writer of the image's operation."""
    return image is not None and image.flow_run_id == flow_run_id


def unlock_image(image: Image | None, flow_run_id: str) -> None:
    if not owns(image, flow_run_id) or image.state not in rules.LOCKED_STATES:
        return
    _fenced(lambda: open_catalog().transition(image.id, rules.unlock, owner=flow_run_id, writer=flow_run_id,
                                              message="file operation succeeded"), image, flow_run_id)


def fail_image(image: Image | None, flow_run_id: str, reason: str) -> None:
    if not owns(image, flow_run_id) or image.state not in rules.LOCKED_STATES:
        return
    _fenced(lambda: open_catalog().transition(image.id, rules.fail, reason, owner=flow_run_id,
                                              writer=flow_run_id, message=reason), image, flow_run_id)


def _fenced(write: Callable[[], object], image: Image, flow_run_id: str) -> None:
    try:
        write()
    except Superseded as exc:
        log.info("flow run %s was superseded on image %s: %s", flow_run_id, image.id, exc)
    except HcxError:
        log.exception("could not move image %s; reconcile will", image.id)


def image_operation(name: str, *, run_name: Callable[[], str], on_failure: Callable,
                    on_success: Callable | None = None) -> Callable[[Callable], Flow]:
    """The decorator of an image operation's flow: `on_failure` runs when the run fails, crashes or
    is cancelled alike (each leaves the image in ERROR), `on_success` when it completes."""
    return flow(name=name, flow_run_name=run_name, on_completion=[on_success] if on_success else [],
                on_failure=[on_failure], on_crashed=[on_failure], on_cancellation=[on_failure], log_prints=True)
