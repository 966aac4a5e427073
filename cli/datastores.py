"""`hcx-image datastore ...`: register and list S3 datastores (Prefect blocks)."""

from __future__ import annotations

from typing import Optional

import typer
from prefect.client.orchestration import get_client
from rich.table import Table

from blocks.datastore import S3Datastore
from catalog.model import Refused, human_size, parse_size
from cli.common import catalog, console, print_json, refusals_exit_1
from cli.runtime import running_platform

app = typer.Typer(help="Register and list datastores (S3 buckets).", no_args_is_help=True)


def all_datastores() -> dict[str, S3Datastore]:
    with get_client(sync_client=True) as client:
        documents = client.read_block_documents_by_type(S3Datastore.get_block_type_slug())
    return {doc.name: S3Datastore.load(doc.name) for doc in documents}


@app.command("add")
@refusals_exit_1
def add(
    name: str,
    endpoint: str = typer.Option(..., "--endpoint", help="S3 endpoint URL"),
    bucket: str = typer.Option(..., "--bucket"),
    access_key: str = typer.Option(..., "--access-key"),
    secret_key: str = typer.Option(..., "--secret-key"),
    prefix: str = typer.Option("", "--prefix"),
    region: str = typer.Option("us-east-1", "--region"),
    kind: str = typer.Option("image", "--kind", help="image or system"),
    limit: Optional[str] = typer.Option(None, "--limit", help="Capacity, e.g. 500G"),
    staging_bucket: Optional[str] = typer.Option(None, "--staging-bucket",
                                                 help="Stage uploads in this bucket (default: the datastore's own)"),
    verify_tls: bool = typer.Option(True, "--verify-tls/--no-verify-tls"),
) -> None:
    """Register a datastore on any S3 endpoint, creating its bucket if needed."""
    if kind not in ("image", "system"):
        raise Refused(f"Unknown --kind {kind!r}: use image or system.")
    with running_platform():
        if name in all_datastores():
            raise Refused(f"Datastore {name!r} already exists: choose another name.")
        store = S3Datastore(
            endpoint_url=endpoint, bucket=bucket, prefix=prefix, region=region, access_key=access_key,
            secret_key=secret_key, kind=kind, limit_bytes=parse_size(limit) if limit else None,
            staging_bucket=staging_bucket, verify_tls=verify_tls,
        )
        store.ensure_buckets()  # proves endpoint and credentials work before anything is saved
        store.save(name)
    console.print(f"datastore {name} registered: s3://{bucket}/{store.prefix} at {endpoint}")


@app.command("list")
@refusals_exit_1
def list_datastores(json_: bool = typer.Option(False, "--json")) -> None:
    """The datastores with their use (never their secrets)."""
    with running_platform():
        stores = all_datastores()
    rows = [
        {"name": name, "kind": s.kind, "endpoint": s.endpoint_url, "bucket": s.bucket, "prefix": s.prefix,
         "region": s.region, "used": catalog().used_bytes(name), "limit": s.limit_bytes,
         "staging_bucket": s.staging_bucket or s.bucket}
        for name, s in sorted(stores.items())
    ]
    if json_:
        print_json(rows)
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "KIND", "ENDPOINT", "BUCKET", "PREFIX", "USED", "LIMIT"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], r["kind"], r["endpoint"], r["bucket"], r["prefix"] or "-",
                      human_size(r["used"]), human_size(r["limit"]) if r["limit"] else "-")
    console.print(table)
