"""The deployments: one per flow of `flows.launcher.deployable()` (every image operation and the
maintenance flows), on the process work pool, with enforced parameter schemas.

One description serves both ways in: `apply_deployments` (what `hcx-image up` runs, through
Prefect's RunnerDeployment) and `render_prefect_yaml` (the repository's `prefect.yaml`, for
`prefect deploy --all`; `hcx-image platform yaml` rewrites it when a flow is added). Entrypoints
are module paths (`flows.launcher.upload`) of the installed package, so a worker needs no pull
step and no remote storage: the code is the one installed in its environment.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import yaml
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker
from pydantic import TypeAdapter

from blocks.prefect_api import prefect_client
from catalog.settings import Settings
from flows.launcher import deployable, entrypoint, maintenance, registry

POOL_TYPE = ProcessWorker.type
ZOMBIE_AUTOMATION = "hcx: crash flow runs whose process is gone"
CRASHED_AUTOMATION = "hcx: settle crashed image operations"

_TRIGGERS: TypeAdapter = TypeAdapter(DeploymentTriggerTypes)


def _intervals(settings: Settings) -> dict[str, int]:
    return {"reconcile": settings.reconcile_every, "monitor": settings.monitor_every,
            "scrub": settings.scrub_every}


def deployment_specs(settings: Settings) -> list[dict[str, Any]]:
    """Every deployment as a prefect.yaml entry (a list of plain dicts)."""
    specs = []
    intervals = _intervals(settings)
    for name, flow in deployable().items():
        is_maintenance = name in maintenance()
        spec: dict[str, Any] = {
            "name": name,
            "entrypoint": entrypoint(name),
            "description": (flow.description or name).strip().splitlines()[0],
            "tags": ["hcx", "maintenance" if is_maintenance else "image-operation"],
            "enforce_parameter_schema": True,
            "work_pool": {"name": settings.work_pool, "job_variables": {}},
            "schedules": [{"interval": intervals[name]}] if intervals.get(name) else [],
            "triggers": [],
        }
        specs.append(spec)
    return specs


def _our_flows(names: list[str]) -> dict[str, Any]:
    """Match events related to the flows called `names` (so a shared Prefect API keeps its other runs)."""
    return {"prefect.resource.role": "flow", "prefect.resource.name": sorted(names)}


def automation_specs(settings: Settings, reconcile_deployment_id: str) -> list[dict[str, Any]]:
    """The automations that make dead runs end (Prefect's "detect zombie flows"):

    1. a flow run of ours whose process stops sending `prefect.flow-run.heartbeat` for
       `stale_run_seconds` after it started Running or beat last (and did not end) is set CRASHED;
    2. a CRASHED image operation runs the reconcile deployment for that run alone, which runs the
       operation's own crash hooks (the image to ERROR, staged bytes swept) as its process would have.
    """
    return [
        {
            "name": ZOMBIE_AUTOMATION,
            "description": "Marks a RUNNING hcx flow run CRASHED when its heartbeats stop (its process died).",
            "enabled": True,
            "trigger": {
                "type": "event", "posture": "Proactive",
                "match": {"prefect.resource.id": "prefect.flow-run.*"},
                "match_related": _our_flows([f.name for f in deployable().values()]),
                "after": ["prefect.flow-run.Running", "prefect.flow-run.heartbeat"],
                "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                           "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
                "for_each": ["prefect.resource.id"],
                "threshold": 1,
                "within": settings.stale_run_seconds,
            },
            "actions": [{
                "type": "change-flow-run-state", "state": "CRASHED",
                "message": f"No heartbeat for {settings.stale_run_seconds}s: the process running this flow run "
                           "is gone (marked crashed by the hcx zombie-run automation).",
            }],
        },
        {
            "name": CRASHED_AUTOMATION,
            "description": "Runs the crash hooks of a crashed image operation through the reconcile deployment.",
            "enabled": True,
            "trigger": {
                "type": "event", "posture": "Reactive",
                "match": {"prefect.resource.id": "prefect.flow-run.*"},
                "match_related": _our_flows([deployable()[name].name for name in registry()]),
                "expect": ["prefect.flow-run.Crashed"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [{
                "type": "run-deployment", "source": "selected", "deployment_id": reconcile_deployment_id,
                "parameters": {"scope": "images",
                               "flow_run_ids": ["{{ event.resource.id | replace('prefect.flow-run.', '') }}"]},
            }],
        },
    ]


def apply_automations(settings: Settings, reconcile_deployment_id: str) -> dict[str, str]:
    """Create or update the automations of `automation_specs`, one of each name (idempotent)."""
    applied = {}
    with prefect_client() as client:
        for spec in automation_specs(settings, reconcile_deployment_id):
            automation = AutomationCore.model_validate(spec)
            existing = client.read_automations_by_name(spec["name"])
            for extra in existing[1:]:
                client.delete_automation(extra.id)
            if existing:
                client.update_automation(existing[0].id, automation)
                applied[spec["name"]] = str(existing[0].id)
            else:
                applied[spec["name"]] = str(client.create_automation(automation))
    return applied


def render_prefect_yaml(settings: Settings | None = None) -> str:
    """The repository's prefect.yaml, rendered with the default settings so it is reproducible."""
    settings = settings or Settings.model_construct()
    document = {
        "name": "hcx-images",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        "pull": [],
        "deployments": deployment_specs(settings),
    }
    header = (
        "# Generated by `hcx-image platform yaml` from flows/launcher.py deployable(): do not edit by hand.\n"
        "# `hcx-image up` applies the same deployments (with the HCX_*_EVERY settings), the dead-run\n"
        "# automations and starts a worker; with a Prefect API of your own: `prefect work-pool create\n"
        "# hcx-process --type process`, then `prefect deploy --all` from this directory and `prefect worker\n"
        "# start --pool hcx-process` (set PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 for the worker). `prefect deploy`\n"
        "# needs PREFECT_API_AUTH_STRING for a server behind one (the embedded one: $HCX_HOME/prefect-auth).\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=100)


def ensure_work_pool(name: str) -> None:
    with prefect_client() as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=POOL_TYPE, base_job_template=ProcessWorker.get_default_base_job_template(),
                description="hcx-images: runs image operations and maintenance flows as local processes",
            ))
        except ObjectAlreadyExists:
            pass


def apply_deployments(settings: Settings) -> dict[str, str]:
    """Create or update every deployment (schedules and triggers included) and the dead-run
    automations; returns deployment name -> id."""
    ensure_work_pool(settings.work_pool)
    flows = deployable()
    applied = {}
    for spec in deployment_specs(settings):
        flow = flows[spec["name"]]
        triggers = [_TRIGGERS.validate_python(t) for t in spec["triggers"]]
        deployment = RunnerDeployment.from_flow(
            flow, name=spec["name"], description=spec["description"], tags=spec["tags"],
            interval=[timedelta(seconds=s["interval"]) for s in spec["schedules"]] or None,
            triggers=triggers, enforce_parameter_schema=True, work_pool_name=settings.work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        deployment.entrypoint = spec["entrypoint"]
        applied[spec["name"]] = str(deployment.apply())
    apply_automations(settings, applied["reconcile"])
    return applied


def deployments_signature(settings: Settings) -> str:
    """Changes whenever a deployment would: a new flow, parameter schema, schedule or trigger."""
    from prefect.utilities.callables import parameter_schema

    flows = deployable()
    described = [(spec, parameter_schema(flows[spec["name"]]).model_dump())
                 for spec in deployment_specs(settings)]
    described.append((automation_specs(settings, "-"), {}))
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def missing_deployments() -> list[str]:
    """Deployments the configured Prefect API lacks (deleted in the UI, say)."""
    with prefect_client() as client:
        names = {d.name for d in client.read_deployments()}
    return sorted(set(deployable()) - names)


def missing_automations() -> list[str]:
    """Our automations the configured Prefect API lacks (deleted in the UI, say)."""
    with prefect_client() as client:
        names = {a.name for a in client.read_automations()}
    return sorted({ZOMBIE_AUTOMATION, CRASHED_AUTOMATION} - names)
