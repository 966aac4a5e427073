"""What a CLI command needs running before it acts: the S3 server, a Prefect API, the datastores.

A Prefect API that is already configured (PREFECT_API_URL, a profile, a test harness) is used as
it is; otherwise the embedded `prefect server` under $HCX_HOME is started and used. Never a
temporary one: Prefect's ephemeral mode is off in every CLI process (and what it starts), so a
Prefect call made where no API is configured is an error instead of a ~5 s temporary server.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from prefect.context import refresh_global_settings_context
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from blocks.datastore import S3Datastore
from catalog.settings import Settings, get_settings
from cli.stack import Stack, StackState

EMBEDDED_DATASTORES = {"default": ("hcx-images", "image"), "system": ("hcx-system", "system")}

# Prefect's default profile allows the ephemeral server (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE is an
# alias): with it off, a client or event sender with no API raises "No Prefect API URL provided".
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
refresh_global_settings_context()


def external_prefect_api() -> str | None:
    return PREFECT_API_URL.value() or None


def ensure_embedded_datastores(state: StackState) -> None:
    """The embedded default's `default` (image) and `system` datastores, on the local SeaweedFS."""
    for name, (bucket, kind) in EMBEDDED_DATASTORES.items():
        try:
            store = S3Datastore.load(name)
        except ValueError:
            store = S3Datastore(endpoint_url=state.s3_endpoint, bucket=bucket, kind=kind,
                                access_key=state.s3_access_key, secret_key=state.s3_secret_key)
            store.save(name)
        else:
            is_embedded = store.access_key.get_secret_value() == state.s3_access_key
            if is_embedded and store.endpoint_url != state.s3_endpoint:  # the embedded S3 moved ports
                store.endpoint_url = state.s3_endpoint
                store.save(name, overwrite=True)
        store.ensure_buckets()


def ensure_deployments(stack: Stack, state: StackState, api_url: str, *, redeploy: bool) -> None:
    """The work pool, the deployments and the dead-run automations on this API (applied again when
    they changed or one is missing, or always with `redeploy`)."""
    from flows.platform import apply_deployments, deployments_signature, missing_automations, missing_deployments

    applied = f"{api_url} {deployments_signature(stack.settings)}"
    if (redeploy or state.deployments_applied != applied or missing_deployments()
            or missing_automations()):
        apply_deployments(stack.settings)
        state.deployments_applied = applied
        stack.save(state)


@contextmanager
def running_platform(settings: Settings | None = None, *, start: bool = True, worker: bool | None = None,
                     redeploy: bool = False) -> Iterator[StackState]:
    """Start what is missing (idempotent) and point this process's Prefect client at it; with
    `worker` (default: when operations go through the deployments, --remote / HCX_REMOTE), also
    the work pool, the deployments and automations (`ensure_deployments`), a worker and the image
    API. On the embedded Prefect server the deployments and automations are always there, so that
    a run whose process dies is marked CRASHED (and every wait on it ends) even before `up` started
    a worker. The embedded server demands its auth string: this process's client and the
    processes it starts get it (PREFECT_API_AUTH_STRING)."""
    settings = settings or get_settings()
    if worker is None:
        from flows.launcher import remote_mode

        worker = remote_mode()
    stack = Stack(settings)
    state = stack.load()
    s3_pid = state.s3.pid
    if start:
        state = stack.ensure_s3(state)
    api_url = external_prefect_api()
    embedded = api_url is None
    updates = {}
    if embedded:
        if start:
            state = stack.ensure_prefect(state)
        api_url = f"{state.prefect_url}/api" if state.prefect.ports else None
        # Child processes (flow runs) must find the same API, with its auth string.
        os.environ.update(stack.prefect_env(state))
        if stack.auth_string():
            updates[PREFECT_API_AUTH_STRING] = stack.auth_string()
    with temporary_settings(updates={PREFECT_API_URL: api_url, **updates}):
        # Register the embedded datastores once per S3 start and per Prefect API.
        if start and (state.s3.pid != s3_pid or state.datastores_registered_at != api_url):
            ensure_embedded_datastores(state)
            state.datastores_registered_at = api_url
            stack.save(state)
        if start and (worker or embedded):
            ensure_deployments(stack, state, api_url, redeploy=redeploy)
        if start and worker:
            stack.ensure_worker(state, api_url)
            stack.ensure_api(state, api_url)
        try:
            yield state
        finally:
            # Send this process's Prefect events while the API is still configured; left to
            # exit time they would wait on an API this process no longer knows.
            EventsWorker.drain_all(timeout=5, at_exit=False)
            if start:  # what this process created under $HCX_HOME (a catalog database, say) too
                stack.lock_down()
