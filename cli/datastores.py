"""`hcx-image datastore ...`: register (administrators) and list S3 datastores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from catalog.model import Refused, human_size
from cli.client import Api
from cli.common import console, literal, print_json, refusals_exit_1, say

app = typer.Typer(help="Register and list datastores (S3 buckets).", no_args_is_help=True)

SECRET_ENV = "HCX_DATASTORE_SECRET_KEY"


def _secret_key(secret_key_file: Path | None) -> str:
    """Never from the command line (other users see it in the process list): a file, the
    environment, or a prompt."""
    if secret_key_file is not None:
        try:
            return secret_key_file.read_text().strip()
        except OSError as exc:
            raise Refused(f"Cannot read --secret-key-file {secret_key_file}: {exc.strerror}.") from None
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    return typer.prompt("Secret key", hide_input=True)


@app.command("add")
@refusals_exit_1
def add(
    name: str,
    endpoint: str = typer.Option(..., "--endpoint", help="S3 endpoint URL"),
    bucket: str = typer.Option(..., "--bucket"),
    access_key: str = typer.Option(..., "--access-key"),
    secret_key_file: Optional[Path] = typer.Option(
        None, "--secret-key-file", help=f"A file holding the secret key (else ${SECRET_ENV}, else a prompt)"),
    prefix: str = typer.Option("", "--prefix"),
    region: str = typer.Option("us-east-1", "--region"),
    kind: str = typer.Option("image", "--kind", help="image or system"),
    limit: Optional[str] = typer.Option(None, "--limit", help="Capacity, e.g. 500G"),
    staging_bucket: Optional[str] = typer.Option(None, "--staging-bucket",
                                                 help="Stage uploads in this bucket (default: the datastore's own)"),
    verify_tls: bool = typer.Option(True, "--verify-tls/--no-verify-tls"),
) -> None:
    """Register a datastore on any S3 endpoint, creating its bucket if needed (administrators)."""
    if kind not in ("image", "system"):
        raise Refused(f"Unknown --kind {kind!r}: use image or system.")
    body = {"name": name, "endpoint": endpoint, "bucket": bucket, "access_key": access_key,
            "secret_key": _secret_key(secret_key_file), "prefix": prefix, "region": region, "kind": kind,
            "limit": limit, "staging_bucket": staging_bucket, "verify_tls": verify_tls}
    store = Api().post("/datastores", body)
    say(f"datastore {name} registered: s3://{store['bucket']}/{store['prefix']} at {store['endpoint']}")


@app.command("list")
@refusals_exit_1
def list_datastores(json_: bool = typer.Option(False, "--json")) -> None:
    """The datastores with their use (never their secrets)."""
    rows = Api().get("/datastores")
    if json_:
        print_json(rows)
        return
    from rich.table import Table  # (only for the verbs that print one)

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "KIND", "ENDPOINT", "BUCKET", "PREFIX", "USED", "LIMIT"):
        table.add_column(column)
    for r in rows:
        table.add_row(*(literal(v) for v in (r["name"], r["kind"], r["endpoint"], r["bucket"], r["prefix"] or "-",
                                              human_size(r["used"]), human_size(r["limit"]) if r["limit"] else "-")))
    console.print(table)
