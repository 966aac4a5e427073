"""`hcx-image`: the command line, assembled from its command modules in the order `--help` lists them."""

import gc

from cli import datastores, images, lifecycle, platform, snapshots, users, vms  # noqa: F401  (their verbs register on `app`)
from cli.app import app

app.add_typer(datastores.app, name="datastore")
app.add_typer(users.users, name="user")
app.add_typer(users.groups, name="group")
app.add_typer(users.quotas, name="quota")
app.add_typer(vms.app, name="vm")
platform.register(app)  # --remote/--local, status, reconcile, monitor, scrub, platform yaml


def main() -> None:
    """The `hcx-image` entry point. What is loaded by now lives as long as the process: frozen, the
    garbage collector skips it, during the command and in its last collection at exit (which took
    0.1-0.3 s of a `create --wait` of a small image)."""
    gc.freeze()
    app()
