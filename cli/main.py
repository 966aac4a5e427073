"""`hcx-image`: the command line, assembled from its command modules in the order `--help` lists them."""

from cli import datastores, images, lifecycle, platform, users  # noqa: F401  (their verbs register on `app`)
from cli.app import app

app.add_typer(datastores.app, name="datastore")
app.add_typer(users.users, name="user")
app.add_typer(users.groups, name="group")
app.add_typer(users.quotas, name="quota")
platform.register(app)  # --remote/--local, status, reconcile, monitor, scrub, platform yaml
