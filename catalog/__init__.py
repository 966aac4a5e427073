"""The image domain: model, lifecycle rules, permissions and the SQL state table.

Nothing here imports Prefect, boto3 or the CLI: adapters depend on the catalog, never the reverse.
"""

# $HCX_HOME when unset: read by the service's settings and by the CLI, which does without them.
DEFAULT_HOME = "~/.hcx-images"
