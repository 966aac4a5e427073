"""The one `hcx-image` Typer app. Each command module registers its verbs on it (cli/images.py,
cli/lifecycle.py, cli/platform.py, cli/datastores.py, cli/users.py); cli/main.py imports them all,
so no module imports another to find the app."""

from __future__ import annotations

import logging

import typer

# Prefect's event sender warns while it flushes at exit (`up` loads Prefect); a CLI user has nothing to do about it.
logging.getLogger("EventsWorker").setLevel(logging.ERROR)

app = typer.Typer(name="hcx-image", help="Manage virtual-machine disk images in S3 datastores.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
