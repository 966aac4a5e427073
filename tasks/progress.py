"""Progress of a long copy, shown as a Prefect progress artifact (throttled) and/or a callback."""

from __future__ import annotations

import threading
import time
from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

MIN_UPDATE_INTERVAL = 0.5  # at most two artifact updates a second


class ProgressArtifact:
    """A byte counter usable as a boto3 Callback (called from several transfer threads). A `total`
    of None (a URL that gives no length) shows 0 % until `finish`."""

    def __init__(self, total: int | None, description: str, also: Callable[[int], None] | None = None):
        self.total = None if total is None else max(total, 1)
        self.description = description
        self.done = 0
        self.also = also
        self._lock = threading.Lock()
        self._last_update = 0.0
        self._shown = 0.0  # the percentage the artifact shows
        # Outside a task run (the CLI) there is no run to attach an artifact to.
        self._artifact_id = create_progress_artifact(0.0, description=description) if TaskRunContext.get() else None

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            due = self.total is not None and (now - self._last_update >= MIN_UPDATE_INTERVAL
                                              or self.done >= self.total)
            if due:
                self._last_update = now
        if self.also is not None:
            self.also(amount)
        if due:
            self._show(self.percent)

    @property
    def percent(self) -> float:
        if self.total is None:
            return 0.0
        return min(100.0, round(100.0 * self.done / self.total, 1))

    def finish(self) -> None:
        self._show(100.0)

    def _show(self, percent: float) -> None:
        # Each update is a call to the Prefect API (70 ms under load): a copy that reached 100 %
        # as its last bytes went by is not told so again by `finish`.
        if self._artifact_id is not None and percent != self._shown:
            update_progress_artifact(self._artifact_id, percent)
            self._shown = percent
