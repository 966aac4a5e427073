"""The retry policy every I/O task shares: transient errors retry with backoff and jitter,
anything else (a refusal, an integrity failure, a missing object) fails at once."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from catalog.model import ConcurrentChange, TransientSourceError, TransientStorageError

RETRIES = 5


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn (a plain function, as Prefect requires)."""
    try:
        state.result()
    except (TransientStorageError, TransientSourceError, ConcurrentChange):
        return True
    except Exception:
        return False
    return False


# Side-effect tasks: never cached (their inputs may be equal while the world is not).
IO_TASK = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),  # 1, 2, 4, 8, 16 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,
)
