"""Settings for every part of hcx-images, read from `HCX_*` variables and an optional `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from catalog import DEFAULT_HOME

MiB = 1024 * 1024

# Floors of reconcile's limits: only the admin group may ask a reconcile run for less.
# Staging TTL: an upload is recorded before its first byte and registered after its last byte has
# been inspected; staging plus inspection of a large image over a slow link takes many minutes, so an
# hour leaves room for an upload in flight while still letting an operator clear staging the same day.
STAGING_TTL_FLOOR_HOURS = 1.0
# Stale run: a live run sends a heartbeat every heartbeat_seconds (Prefect's minimum, 30 s); below two
# missed heartbeats a slow but live run would be judged dead and its image moved to ERROR under it.
STALE_RUN_FLOOR_SECONDS = 60

GiB = 1024 * MiB
TiB = 1024 * GiB
# S3 multipart uploads (every datastore): at most 10,000 parts of at most 5 GiB. Transfers use at
# most S3_PARTS of them (a margin), so one object (a raw image is one) holds at most S3_MAX_OBJECT.
S3_MAX_PART = 5 * GiB
S3_PARTS = 9_000
S3_MAX_OBJECT = S3_PARTS * S3_MAX_PART


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HCX_", env_file=".env", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path(DEFAULT_HOME).expanduser(),
        description="Everything the embedded default keeps (S3 data, catalog, Prefect home, logs).",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the catalog; default: SQLite under home."
    )
    admin_group: str = Field(default="oneadmin", description="Members may do everything.")
    default_datastore: str = "default"
    system_datastore: str = Field(
        default="system", description="Where VMs' copies of non-persistent images go (`hcx-image up` makes it).")
    staging_prefix: str = Field(
        default="staging/",
        description="Key prefix of the staging area inside each datastore's staging bucket.",
    )
    safe_dirs: list[Path] = Field(
        default_factory=list,
        description="Directories from which local files may be uploaded even when under a "
        "restricted directory (home directories, hcx's own home).",
    )
    # Transfer bounds. Peak transfer memory per process is about
    # part_size * (max_concurrency + queued_parts): 8 MiB * (4 + 4) = 64 MiB by default
    # (parts grow for objects over 9,000 parts, see S3Datastore.transfer_config).
    part_size: int = Field(default=8 * MiB, ge=5 * MiB)
    max_concurrency: int = Field(default=4, ge=1)
    queued_parts: int = Field(default=4, ge=1)
    stream_chunk: int = Field(default=1 * MiB, ge=64 * 1024)
    max_virtual_size: int = Field(
        default=64 * TiB, gt=0,
        description="Largest virtual size (bytes) an image may have: an uploaded image whose header "
        "claims more, or `create --size` above it, is refused.",
    )
    staging_ttl_hours: float = Field(
        default=24.0, ge=STAGING_TTL_FLOOR_HOURS,
        description="Reconcile removes a recorded upload never registered (and staged bytes no image uses "
        "any more) once this old; objects no staging record or image knows are only reported.",
    )
    url_allow_networks: str | None = Field(
        default=None,
        description="Networks (a JSON list of CIDRs, e.g. [\"10.20.0.0/16\"]) that images imported from a URL may "
        "come from although they are not globally routable (private, loopback, link-local); default: none.",
    )
    remote: bool = Field(
        default=False, description="Send operations through the Prefect deployments (worker)."
    )
    # The platform: work pool, worker and the maintenance schedules (seconds; 0 = no schedule).
    work_pool: str = Field(default="hcx-process", description="Process work pool of the deployments.")
    worker_poll_seconds: float = Field(default=2.0, gt=0, description="How often the worker asks for runs.")
    reconcile_every: int = Field(default=300, ge=0, description="Seconds between scheduled reconcile runs.")
    monitor_every: int = Field(default=300, ge=0, description="Seconds between scheduled monitor runs.")
    scrub_every: int = Field(default=86400, ge=0, description="Seconds between scheduled scrub runs.")
    heartbeat_seconds: int = Field(
        default=30, ge=30, description="Flow-run heartbeat of the runs we start (Prefect's minimum is 30)."
    )
    stale_run_seconds: int = Field(
        default=90, ge=STALE_RUN_FLOOR_SECONDS,
        description="A RUNNING flow run with no heartbeat for this long has lost its process: the zombie-run "
        "automation that `hcx-image up` creates marks it CRASHED (its `within`). Keep it above "
        "heartbeat_seconds (runners started elsewhere must set PREFECT_FLOWS_HEARTBEAT_FREQUENCY below it).",
    )
    @field_validator("stale_run_seconds")
    @classmethod
    def _outlives_a_heartbeat(cls, value: int, info: ValidationInfo) -> int:
        beat = info.data.get("heartbeat_seconds", 30)
        if value <= beat:
            raise ValueError(f"HCX_STALE_RUN_SECONDS ({value}) must be above HCX_HEARTBEAT_SECONDS ({beat}), or "
                             "every live flow run would be marked CRASHED between two heartbeats; raise it.")
        return value

    stop_run_seconds: int = Field(
        default=30, gt=0,
        description="How long a forced delete waits for the run it superseded to stop before it retries.",
    )

    # Ports of the embedded stack; 0 means "pick a free port at `hcx-image up`".
    s3_port: int = 0
    prefect_port: int = 0
    prefect_database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (postgresql+asyncpg://...) of the embedded Prefect server's database; "
        "default: SQLite under home, whose single writer can stall the server for up to a minute under load.",
    )

    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'catalog.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
