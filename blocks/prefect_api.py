"""The Prefect API client our code uses: Prefect's own sync client, with one TLS context per process.

Unless it is given one, Prefect builds a TLS context for every client it makes, loading the whole CA
bundle each time (15-50 ms, for an embedded server that speaks plain http). The image API makes a
client for every `GET /runs/{id}` a waiting CLI sends, so that was most of the answer's time.
"""

from __future__ import annotations

import ssl
from functools import cache

import certifi
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY


@cache
def tls_context() -> ssl.SSLContext:
    """The context Prefect would build for each client (SyncPrefectClient.__init__), built once."""
    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():  # the operator's choice, kept as Prefect keeps it
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def prefect_client() -> SyncPrefectClient:
    """A sync client of the configured Prefect API (use as a context manager): in a flow run, the
    run's own (Prefect keeps one per run); elsewhere a new one on the process's TLS context."""
    if (context := SyncClientContext.get()) is not None:
        return context.client
    return get_client(sync_client=True, httpx_settings={"verify": tls_context()})
