"""A tenant's URL whose query is a credential (a pre-signed URL's signature) is kept in a Prefect
Secret block while its import fetches it: the flow run's parameters (shown in the Prefect UI and
its REST API), the operation recorded in the catalog and every message carry the URL without its
query and the block's name. The block goes once the bytes are staged, or when the import failed.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from prefect.blocks.system import Secret
from prefect.exceptions import ObjectNotFound

from blocks.prefect_api import prefect_client
from catalog.model import NotFound

SEALED_PREFIX = "hcx-url-"


def unsealed_form(url: str) -> str:
    """`url` as the request records it: without its query (the signature), `?…` saying it had one."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment="")) + "?…" if parts.query else url


def seal_url(url: str, upload_id: str) -> str | None:
    """Keep `url` under a name of the service's making; None when it has no query to hide."""
    if not urlsplit(url).query:
        return None
    name = f"{SEALED_PREFIX}{upload_id}"
    Secret(value=url).save(name, overwrite=True)
    return name


def unseal_url(name: str) -> str:
    try:
        return Secret.load(name, _sync=True).get()
    except ValueError:
        raise NotFound("The import's URL is no longer kept (its query was dropped once its bytes were fetched or "
                       "the import failed): import the image again with a fresh URL.") from None


def drop_sealed_url(name: str | None) -> None:
    """Idempotent: a block already gone is fine."""
    if not name:
        return
    with prefect_client() as client:
        try:
            client.delete_block_document(client.read_block_document_by_name(name, block_type_slug="secret").id)
        except ObjectNotFound:
            pass
