"""Recovery after a worker died or was stopped: fail abandoned deployments, bring back the last good version,
and remove containers that belong to no live deployment."""

import uuid
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import func, select, update

from jarvis_deploy import naming
from jarvis_deploy.compose.render import load_spec
from jarvis_deploy.db.locks import try_project_lock
from jarvis_deploy.db.models import ComposeSpec, Deployment, Project
from jarvis_deploy.deployments.runner import EventRecorder, WorkerContext
from jarvis_deploy.deployments.schemas import DeploymentStatus
from jarvis_deploy.engine.docker import ContainerInfo
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.engine.health import wait_until_healthy
from jarvis_deploy.proxy.caddy import CaddyError
from jarvis_deploy.strategies.base import DeploymentPlan, DeploymentRun, switch_to
from jarvis_deploy.webhooks.delivery import notify_final_state

logger = structlog.get_logger(__name__)

# Deployments in these states may own containers; a container of any other deployment is an orphan.
LIVE_STATUSES = {DeploymentStatus.QUEUED.value, DeploymentStatus.IN_PROGRESS.value, DeploymentStatus.SUCCEEDED.value}


async def recover_abandoned(context: WorkerContext, heartbeat_timeout: float) -> int:
    """Fail every in-progress deployment whose worker is gone; returns how many were recovered.

    A deployment counts as abandoned when its heartbeat is older than `heartbeat_timeout` seconds
    and nobody holds its project's lock (a live worker holds it for the whole run).
    """
    cutoff = datetime.now(UTC) - timedelta(seconds=heartbeat_timeout)
    async with context.sessionmaker() as session:
        rows = (
            await session.execute(
                select(Deployment.id, Deployment.project_id, Project.name)
                .join(Project)
                .where(
                    Deployment.status == DeploymentStatus.IN_PROGRESS.value,
                    func.coalesce(Deployment.heartbeat_at, Deployment.created_at) < cutoff,
                )
            )
        ).all()

    recovered = 0
    for deployment_id, project_id, project in rows:
        async with try_project_lock(context.db_engine, project_id) as locked:
            if not locked:
                continue
            reason = "the worker running this deployment stopped sending heartbeats; its containers were removed"
            await abandon(context, deployment_id, project_id, project, reason)
            recovered += 1
    return recovered


async def abandon(
    context: WorkerContext, deployment_id: uuid.UUID, project_id: uuid.UUID, project: str, reason: str
) -> None:
    """Put the last good version back in service, remove a deployment's containers, and mark it failed.

    The caller holds the project's lock.
    """
    record = EventRecorder(context.sessionmaker, deployment_id)

    containers = await context.engine.list_containers({naming.LABEL_DEPLOYMENT: str(deployment_id)})
    route = await context.router.route_of(project_id)
    if route is not None and route.deployment_id == deployment_id:
        # The route points at this deployment's containers: the last good version takes the traffic
        # back before they go.
        await restore_last_good(context, project_id, project, record)
        await _remove(context, containers)
    else:
        # Nothing routes to them, and they may hold host ports that the last good version needs.
        await _remove(context, containers)
        await restore_last_good(context, project_id, project, record)

    async with context.sessionmaker() as session:
        await session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id, Deployment.status == DeploymentStatus.IN_PROGRESS.value)
            .values(status=DeploymentStatus.FAILED.value, error=reason, finished_at=func.now())
        )
        await session.commit()
    await record("failed", reason)
    logger.warning("deployment.abandoned", deployment_id=str(deployment_id), project=project, reason=reason)
    await notify_final_state(context, deployment_id)


async def _remove(context: WorkerContext, containers: list[ContainerInfo]) -> None:
    for container in containers:
        await context.engine.remove(container.id)


async def restore_last_good(context: WorkerContext, project_id: uuid.UUID, project: str, record: EventRecorder) -> None:
    """Start the latest succeeded deployment's containers again and route the project's domains to them."""
    async with context.sessionmaker() as session:
        good = await session.scalar(
            select(Deployment)
            .where(Deployment.project_id == project_id, Deployment.status == DeploymentStatus.SUCCEEDED.value)
            .order_by(Deployment.version.desc())
            .limit(1)
        )
        spec = await session.get(ComposeSpec, good.spec_id) if good else None
    if good is None or spec is None:
        return

    plan = DeploymentPlan(
        good.id, project_id, project, good.version, good.checksum, load_spec(spec.yaml), context.settings.instance_id
    )
    run = DeploymentRun(plan=plan, engine=context.engine, record=record, options=context.run_options(), router=context.router)
    containers = await context.engine.list_containers({naming.LABEL_DEPLOYMENT: str(good.id)})
    serving = []
    for container in containers:
        try:
            if container.state != "running":
                await context.engine.start(container.id)
            await wait_until_healthy(context.engine, container.id, plan.port, None)
        except (EngineError, HealthCheckFailed) as error:
            logger.warning("recovery.restart_failed", project=project, container=container.name, error=str(error))
            continue
        serving.append(container.id)

    if serving and run.routed:
        try:
            await switch_to(run, serving)
        except CaddyError as error:
            logger.warning("recovery.switch_failed", project=project, error=str(error))
    if serving:
        await record("restored", f"version {good.version} serves again ({len(serving)} container(s))")


async def remove_orphans(context: WorkerContext) -> int:
    """Remove containers with this instance's labels whose deployment is gone or ended; returns how many.

    Containers without the service's labels, or made by another instance, are never touched. Projects whose lock is held are
    skipped, because a deployment of theirs is running.
    """
    containers = await context.engine.list_containers(
        {naming.LABEL_MANAGED: "true", naming.LABEL_INSTANCE: context.settings.instance_id}
    )
    deployment_ids = set()
    for container in containers:
        try:
            deployment_ids.add(uuid.UUID(container.labels.get(naming.LABEL_DEPLOYMENT, "")))
        except ValueError:
            continue
    async with context.sessionmaker() as session:
        rows = await session.execute(
            select(Deployment.id, Deployment.status, Deployment.project_id).where(Deployment.id.in_(deployment_ids))
        )
        known = {row.id: (row.status, row.project_id) for row in rows}

    removed = 0
    for container in containers:
        label = container.labels.get(naming.LABEL_DEPLOYMENT, "")
        try:
            deployment_id = uuid.UUID(label)
        except ValueError:
            deployment_id = None
        status, project_id = known.get(deployment_id, (None, None))
        if status in LIVE_STATUSES:
            continue
        if project_id is not None:
            async with try_project_lock(context.db_engine, project_id) as locked:
                if not locked:
                    continue
                await context.engine.remove(container.id)
        else:
            await context.engine.remove(container.id)
        removed += 1
        logger.info("orphan.removed", container=container.name, deployment_id=label or None, status=status)
    # TODO: networks and volumes of removed projects are not cleaned up; volumes may hold data.
    return removed
