"""Settings for every part of hcx-images, read from `HCX_*` variables and an optional `.env`."""

from __future__ import annotations

import getpass
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HCX_", env_file=".env", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hcx-images",
        description="Everything the embedded default keeps (S3 data, catalog, Prefect home, logs).",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the catalog; default: SQLite under home."
    )
    user: str = Field(default_factory=getpass.getuser, description="Who this CLI acts as.")
    group: str = Field(default="users", description="The acting user's group.")
    admin_group: str = Field(default="oneadmin", description="Members may do everything.")
    default_datastore: str = "default"
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
    staging_ttl_hours: float = Field(default=24.0, gt=0)
    remote: bool = Field(
        default=False, description="Send operations through the Prefect deployments (worker)."
    )
    # The platform: work pool, worker and the maintenance schedules (seconds; 0 = no schedule).
    work_pool: str = Field(default="hcx-process", description="Process work pool of the deployments.")
    worker_poll_seconds: float = Field(default=2.0, gt=0, description="How often the worker asks for runs.")
    reconcile_interval: int = Field(default=300, ge=0)
    monitor_interval: int = Field(default=300, ge=0)
    scrub_interval: int = Field(default=86400, ge=0)
    heartbeat_seconds: int = Field(
        default=30, ge=30, description="Flow-run heartbeat of the runs we start (Prefect's minimum is 30)."
    )
    stale_run_seconds: int = Field(
        default=120, gt=0,
        description="A RUNNING flow run with no heartbeat for this long has lost its process: reconcile "
        "marks it CRASHED. Keep it above heartbeat_seconds (runners started elsewhere must use "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY <= this / 2).",
    )
    # Ports of the embedded stack; 0 means "pick a free port at `hcx-image up`".
    s3_port: int = 0
    prefect_port: int = 0

    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'catalog.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
