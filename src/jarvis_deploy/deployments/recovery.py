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
from jarvis_deploy.deployments.runner import EventRecorder, WorkerContext, prune
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
    await _undo(context, deployment_id, project_id, project, record)

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
    await prune(context, project_id)


async def hand_back(context: WorkerContext, deployment_id: uuid.UUID, project_id: uuid.UUID, project: str) -> None:
    """Undo a deployment the worker stops running because it shuts down, and mark it queued again.

    The job goes back to the queue, so another worker runs the deployment from the start. The
    caller holds the project's lock.
    """
    record = EventRecorder(context.sessionmaker, deployment_id)
    await _undo(context, deployment_id, project_id, project, record)

    async with context.sessionmaker() as session:
        await session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id, Deployment.status == DeploymentStatus.IN_PROGRESS.value)
            .values(status=DeploymentStatus.QUEUED.value, started_at=None, heartbeat_at=None)
        )
        await session.commit()
    await record(
        "handed_back",
        "the worker shut down before the deployment finished; what it had started was removed, and the "
        "deployment is queued again for another worker",
    )
    logger.warning("deployment.handed_back", deployment_id=str(deployment_id), project=project)


async def _undo(
    context: WorkerContext, deployment_id: uuid.UUID, project_id: uuid.UUID, project: str, record: EventRecorder
) -> None:
    """Remove a deployment's containers and route the project to its last good version again."""
    containers = await context.engine.list_containers({naming.LABEL_DEPLOYMENT: str(deployment_id)})
    route = await context.router.route_of(project_id)
    if route is not None and route.deployment_id == deployment_id:
        # The route points at this deployment's containers: the last good version takes the traffic
        # back before they go. Without one, the route goes, so that no request waits for containers
        # that no longer exist.
        if not await restore_last_good(context, project_id, project, record):
            await _remove_route(context, project_id, project)
        await _remove(context, containers)
    else:
        # Nothing routes to them, and they may hold host ports that the last good version needs.
        await _remove(context, containers)
        await restore_last_good(context, project_id, project, record)


async def _remove_route(context: WorkerContext, project_id: uuid.UUID, project: str) -> None:
    try:
        await context.router.remove(project_id, project)
    except CaddyError as error:
        logger.warning("recovery.route_removal_failed", project=project, error=str(error))


async def _remove(context: WorkerContext, containers: list[ContainerInfo]) -> None:
    for container in containers:
        await context.engine.remove(container.id)


async def restore_last_good(context: WorkerContext, project_id: uuid.UUID, project: str, record: EventRecorder) -> bool:
    """Start the latest succeeded deployment's containers again and route the project's domains to them.

    Returns whether any of them serves again.
    """
    async with context.sessionmaker() as session:
        good = await session.scalar(
            select(Deployment)
            .where(Deployment.project_id == project_id, Deployment.status == DeploymentStatus.SUCCEEDED.value)
            .order_by(Deployment.version.desc())
            .limit(1)
        )
        spec = await session.get(ComposeSpec, good.spec_id) if good and good.spec_id else None
    if good is None or spec is None:
        return False

    plan = DeploymentPlan(
        good.id, project_id, project, good.version, good.checksum, load_spec(spec.yaml), context.settings.instance_id
    )
    run = DeploymentRun(plan=plan, engine=context.engine, record=record, options=context.run_options(), router=context.router)
    containers = await context.engine.list_containers({naming.LABEL_DEPLOYMENT: str(good.container_owner)})
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
            await switch_to(run, serving, owner=good.container_owner)
        except CaddyError as error:
            logger.warning("recovery.switch_failed", project=project, error=str(error))
    if serving:
        await record("restored", f"version {good.version} serves again ({len(serving)} container(s))")
    return bool(serving)


async def restart_stopped_live(context: WorkerContext) -> int:
    """Start the containers of each project's live deployment again when some are not running; returns how many projects.

    The database records what should run: a Docker Engine restart, a host reboot or a failed restore
    can leave the live version's containers exited. Projects whose lock is held are skipped,
    because a deployment of theirs is running and may have stopped them on purpose.
    """
    async with context.sessionmaker() as session:
        live = list(
            await session.execute(
                select(Deployment, Project.name)
                .join(Project)
                .where(Deployment.status == DeploymentStatus.SUCCEEDED.value)
                .order_by(Deployment.project_id, Deployment.version.desc())
                .distinct(Deployment.project_id)
            )
        )

    restarted = 0
    for deployment, project in live:
        containers = await context.engine.list_containers(
            {naming.LABEL_DEPLOYMENT: str(deployment.container_owner), naming.LABEL_INSTANCE: context.settings.instance_id}
        )
        if not containers or all(container.state == "running" for container in containers):
            continue
        async with try_project_lock(context.db_engine, deployment.project_id) as locked:
            if not locked:
                continue
            logger.warning(
                "recovery.live_containers_stopped",
                deployment_id=str(deployment.id),
                project=project,
                stopped=[container.name for container in containers if container.state != "running"],
            )
            record = EventRecorder(context.sessionmaker, deployment.id)
            await restore_last_good(context, deployment.project_id, project, record)
            restarted += 1
    return restarted


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
        # A no-op deployment is served by an earlier deployment's containers, which stay live with it.
        reused = await session.execute(
            select(Deployment.reused_from, Deployment.project_id).where(
                Deployment.reused_from.in_(deployment_ids), Deployment.status.in_(LIVE_STATUSES)
            )
        )
        for owner, project_id in reused:
            known[owner] = (DeploymentStatus.SUCCEEDED.value, project_id)

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
    return removed


async def remove_orphan_networks_and_volumes(context: WorkerContext) -> int:
    """Remove this instance's project networks and volumes that nothing needs any more; returns how many.

    A network goes when its project has no queued, running or succeeded deployment and no container
    is attached. A volume contains data, so it goes only when its project is not in the database at
    all. Objects of other instances, without the labels, or of a project whose lock is held stay.
    """
    labels = {naming.LABEL_MANAGED: "true", naming.LABEL_INSTANCE: context.settings.instance_id}
    networks = await context.engine.list_networks(labels)
    volumes = await context.engine.list_volumes(labels)
    names = {item["Labels"].get(naming.LABEL_PROJECT) for item in [*networks, *volumes]} - {None}
    if not names:
        return 0

    async with context.sessionmaker() as session:
        projects = dict((await session.execute(select(Project.name, Project.id).where(Project.name.in_(names)))).all())
        active = set(
            await session.scalars(
                select(Project.name)
                .join(Deployment, Deployment.project_id == Project.id)
                .where(Project.name.in_(names), Deployment.status.in_(LIVE_STATUSES))
                .distinct()
            )
        )

    removed = 0
    for network in networks:
        project = network["Labels"].get(naming.LABEL_PROJECT)
        if project is None or project in active:
            continue
        if await _remove_unless_locked(context, projects.get(project), context.engine.remove_network, network["Id"]):
            removed += 1
            logger.info("orphan.network_removed", network=network["Name"], project=project)
    for volume in volumes:
        project = volume["Labels"].get(naming.LABEL_PROJECT)
        if project is None or project in projects:
            continue
        if await context.engine.remove_volume(volume["Name"]):
            removed += 1
            logger.info("orphan.volume_removed", volume=volume["Name"], project=project)
    return removed


async def _remove_unless_locked(context: WorkerContext, project_id: uuid.UUID | None, remove, target: str) -> bool:
    """Run `remove(target)` unless a deployment of the project holds its lock; returns whether it removed."""
    if project_id is None:
        return await remove(target)
    async with try_project_lock(context.db_engine, project_id) as locked:
        if not locked:
            return False
        return await remove(target)
