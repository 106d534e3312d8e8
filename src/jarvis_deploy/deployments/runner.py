"""Carries out one deployment or stop under the project's lock, recording every step as an event."""

import asyncio
import uuid
from dataclasses import dataclass, field

import structlog
from pydantic import SecretStr
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jarvis_deploy import naming
from jarvis_deploy.compose.render import load_spec
from jarvis_deploy.config import Settings
from jarvis_deploy.db.locks import project_lock
from jarvis_deploy.db.models import ComposeSpec, Deployment, DeploymentEvent, Project
from jarvis_deploy.db.session import create_engine, create_sessionmaker
from jarvis_deploy.deployments.retention import prune_project
from jarvis_deploy.deployments.schemas import DeploymentStatus
from jarvis_deploy.deployments.unchanged import unchanged_from
from jarvis_deploy.engine.docker import DockerEngine
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed, TranslationError
from jarvis_deploy.proxy.caddy import CaddyClient, CaddyError
from jarvis_deploy.proxy.routes import TrafficRouter
from jarvis_deploy.secrets.cipher import SecretError
from jarvis_deploy.secrets.store import load_spec_secrets, redact
from jarvis_deploy.strategies import get_strategy
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentPlan,
    DeploymentRolledBack,
    DeploymentRun,
    RunOptions,
    remove_containers,
)
from jarvis_deploy.webhooks.delivery import notify_final_state

logger = structlog.get_logger(__name__)

HEARTBEAT_INTERVAL = 5.0
FAULT_PAUSE_SECONDS = 3600.0
CLEANUP_WAIT_SECONDS = 120.0


class DeploymentNotFound(Exception):
    """The job names a deployment that is not in the database."""


@dataclass
class WorkerContext:
    settings: Settings
    db_engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    engine: DockerEngine
    router: TrafficRouter
    # Hand-backs still running; close() waits for them. arq stops waiting for a job when it is
    # cancelled a second time, so the job's clean-up can outlive the job.
    cleanups: set[asyncio.Task] = field(default_factory=set)

    @classmethod
    def create(cls, settings: Settings, *, with_caddy: bool = True) -> "WorkerContext":
        """Build the shared clients; Caddy's only when an admin URL is set and `with_caddy` is true."""
        db_engine = create_engine(settings.database_url)
        sessionmaker = create_sessionmaker(db_engine)
        caddy = None
        if with_caddy and settings.caddy_admin_url:
            caddy = CaddyClient(settings.caddy_admin_url, settings.caddy_server, settings.caddy_listen)
        resolver = settings.upstream_resolver if settings.resolved_upstreams else ""
        router = TrafficRouter(sessionmaker, caddy, resolver, settings.upstream_lookup_refresh, settings.instance_id)
        return cls(settings, db_engine, sessionmaker, DockerEngine(settings.docker_url), router)

    async def close(self) -> None:
        if self.cleanups:
            logger.info("worker.waiting_for_cleanups", count=len(self.cleanups))
            await asyncio.wait(self.cleanups, timeout=CLEANUP_WAIT_SECONDS)
        await self.engine.close()
        if self.router.caddy is not None:
            await self.router.caddy.close()
        await self.db_engine.dispose()

    def run_options(self) -> RunOptions:
        return RunOptions(
            stop_timeout=self.settings.stop_timeout,
            proxy_network=self.settings.proxy_network,
            upstream_mode=self.settings.upstream_mode,
            drain_seconds=self.settings.drain_seconds,
            watch_seconds=self.settings.watch_seconds,
            admin_api=self.router.caddy is not None,
            upstream_address_range=(
                self.settings.upstream_network if self.router.caddy is not None and self.router.resolver else None
            ),
        )


class EventRecorder:
    """Appends events to a deployment's timeline, each in its own committed transaction."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        deployment_id: uuid.UUID,
        pause_after: frozenset[str] = frozenset(),
    ) -> None:
        self.sessionmaker = sessionmaker
        self.deployment_id = deployment_id
        # Values removed from every message, such as container log lines quoted in a failure reason.
        self.secrets: dict[str, SecretStr] = {}
        # Fault injection: stages after which the run pauses, so a crash test can kill the worker there.
        self.pause_after = pause_after

    async def __call__(self, stage: str, message: str, duration_ms: int | None = None) -> None:
        message = redact(message, self.secrets)
        async with self.sessionmaker() as session:
            session.add(
                DeploymentEvent(deployment_id=self.deployment_id, stage=stage, message=message, duration_ms=duration_ms)
            )
            await session.commit()
        logger.info("deployment.event", deployment_id=str(self.deployment_id), stage=stage, duration_ms=duration_ms)
        if stage in self.pause_after:
            logger.warning("deployment.paused_for_fault_injection", deployment_id=str(self.deployment_id), stage=stage)
            await asyncio.sleep(FAULT_PAUSE_SECONDS)


async def _set_status(
    sessionmaker: async_sessionmaker[AsyncSession], deployment_id: uuid.UUID, status: DeploymentStatus, **values
) -> None:
    async with sessionmaker() as session:
        await session.execute(update(Deployment).where(Deployment.id == deployment_id).values(status=status.value, **values))
        await session.commit()


async def _heartbeat(sessionmaker: async_sessionmaker[AsyncSession], deployment_id: uuid.UUID) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        try:
            async with sessionmaker() as session:
                await session.execute(
                    update(Deployment).where(Deployment.id == deployment_id).values(heartbeat_at=func.now())
                )
                await session.commit()
        except Exception as error:  # noqa: BLE001  (a missed heartbeat must not end the deployment)
            logger.warning("deployment.heartbeat_failed", deployment_id=str(deployment_id), error=str(error))


async def _load(session: AsyncSession, deployment_id: uuid.UUID) -> tuple[Deployment, Project, ComposeSpec]:
    deployment = await session.get(Deployment, deployment_id)
    if deployment is None:
        raise DeploymentNotFound(f"no deployment with id {deployment_id}")
    project = await session.get(Project, deployment.project_id)
    spec = await session.get(ComposeSpec, deployment.spec_id)
    assert project is not None and spec is not None
    return deployment, project, spec


async def run_deployment(context: WorkerContext, deployment_id: uuid.UUID) -> str:
    """Run a queued deployment to a final state under the project's lock; returns that state.

    Jobs of one project may reach the lock in any order, so the job first runs every older queued
    deployment of the project, oldest first: deployments run in the order they were accepted.
    """
    async with context.sessionmaker() as session:
        deployment, project, _ = await _load(session, deployment_id)

    async with project_lock(context.db_engine, project.id):
        await _take_over_abandoned(context, project, deployment_id)
        while True:
            async with context.sessionmaker() as session:
                next_id = await session.scalar(
                    select(Deployment.id)
                    .where(
                        Deployment.project_id == project.id,
                        Deployment.status == DeploymentStatus.QUEUED.value,
                        Deployment.version <= deployment.version,
                    )
                    .order_by(Deployment.version)
                    .limit(1)
                )
                if next_id is None:
                    status = await session.scalar(select(Deployment.status).where(Deployment.id == deployment_id))
                    logger.info("deployment.skipped", deployment_id=str(deployment_id), status=status)
                    return status
            outcome = await _run_locked(context, next_id)
            if next_id == deployment_id:
                return outcome


async def _take_over_abandoned(context: WorkerContext, project: Project, job_deployment_id: uuid.UUID) -> None:
    """Clean up in-progress deployments of the project; the caller holds its lock, so their workers are gone.

    The job's own deployment (arq runs a job again after its worker stopped) is handed back and
    runs again. Any other one fails.
    """
    from jarvis_deploy.deployments.recovery import (  # recovery imports this module
        abandon,
        hand_back,
    )

    async with context.sessionmaker() as session:
        abandoned = list(
            await session.scalars(
                select(Deployment.id).where(
                    Deployment.project_id == project.id, Deployment.status == DeploymentStatus.IN_PROGRESS.value
                )
            )
        )
    for deployment_id in abandoned:
        if deployment_id == job_deployment_id:
            await hand_back(context, deployment_id, project.id, project.name)
            continue
        reason = "the worker running this deployment stopped; the next deployment of the project took over"
        await abandon(context, deployment_id, project.id, project.name, reason)


async def _run_locked(context: WorkerContext, deployment_id: uuid.UUID) -> str:
    """Run one queued deployment; the caller holds the project's lock."""
    async with context.sessionmaker() as session:
        deployment, project, spec = await _load(session, deployment_id)
    log = logger.bind(deployment_id=str(deployment_id), project=project.name, version=deployment.version)
    record = EventRecorder(context.sessionmaker, deployment_id, frozenset(context.settings.pause_after_stages))
    await _set_status(
        context.sessionmaker,
        deployment_id,
        DeploymentStatus.IN_PROGRESS,
        started_at=func.now(),
        heartbeat_at=func.now(),
    )
    await record("in_progress", f"worker started version {deployment.version} with strategy {deployment.strategy}")
    log.info("deployment.started", strategy=deployment.strategy)

    plan = DeploymentPlan(
        deployment_id=deployment_id,
        project_id=project.id,
        project=project.name,
        version=deployment.version,
        checksum=deployment.checksum,
        document=load_spec(spec.yaml),
        instance=context.settings.instance_id,
    )
    run = DeploymentRun(
        plan=plan, engine=context.engine, record=record, options=context.run_options(), router=context.router
    )
    if not deployment.force:
        live = await unchanged_from(context.engine, context.router, context.sessionmaker, deployment, plan)
        if live is not None:
            await _finish_unchanged(context, deployment, live)
            log.info("deployment.unchanged", live_deployment_id=str(live.id))
            return DeploymentStatus.SUCCEEDED.value

    heartbeat = asyncio.create_task(_heartbeat(context.sessionmaker, deployment_id))
    time_limit = asyncio.timeout(context.settings.job_timeout)
    try:
        plan.secrets = await _load_secrets(context, spec.id, plan)
        record.secrets = plan.secrets
        async with time_limit:
            await get_strategy(deployment.strategy).deploy(run)
    except DeploymentRolledBack as error:
        reason = redact(str(error), plan.secrets)
        await _end(context, run, DeploymentStatus.ROLLED_BACK, f"rolled back: {reason}")
        log.warning("deployment.rolled_back", reason=reason)
        return DeploymentStatus.ROLLED_BACK.value
    except (DeploymentFailed, EngineError, HealthCheckFailed, TranslationError, SecretError) as error:
        reason = redact(str(error), plan.secrets)
        await _end(context, run, DeploymentStatus.FAILED, reason)
        log.warning("deployment.failed", reason=reason)
        return DeploymentStatus.FAILED.value
    except CaddyError as error:
        # The route row is written before Caddy or the resolver confirms a switch, so it may name
        # this run's containers already: the last good version gets the route back before they go.
        from jarvis_deploy.deployments.recovery import (
            abandon,  # recovery imports this module
        )

        reason = redact(str(error), plan.secrets)
        await abandon(context, deployment_id, project.id, project.name, reason)
        log.warning("deployment.failed", reason=reason)
        return DeploymentStatus.FAILED.value
    except TimeoutError as error:
        from jarvis_deploy.deployments.recovery import (
            abandon,  # recovery imports this module
        )

        if time_limit.expired():
            reason = (
                f"the deployment did not finish within its time limit of {context.settings.job_timeout}s "
                "(JARVIS_JOB_TIMEOUT); its containers were removed"
            )
        else:
            reason = f"the deployment stopped on a time-out: {redact(str(error), plan.secrets) or 'no detail'}"
        await abandon(context, deployment_id, project.id, project.name, reason)
        log.warning("deployment.timed_out", reason=reason)
        return DeploymentStatus.FAILED.value
    except asyncio.CancelledError:
        # The worker is shutting down: undo this run, then let the queue run the deployment again
        # on another worker. A second SIGTERM cancels again, and the clean-up goes on; the worker
        # waits for it in WorkerContext.close before it exits.
        from jarvis_deploy.deployments.recovery import (
            hand_back,  # recovery imports this module
        )

        await _finish_despite_cancellation(context, hand_back(context, deployment_id, project.id, project.name))
        raise
    except BaseException:
        # An unexpected error: leave nothing of this run behind, and put the last good version back in service.
        from jarvis_deploy.deployments.recovery import (
            abandon,  # recovery imports this module
        )

        reason = "the deployment stopped on an internal error of the worker; its containers were removed"
        await abandon(context, deployment_id, project.id, project.name, reason)
        raise
    finally:
        heartbeat.cancel()

    await _succeed(context, deployment_id, project.id, run.image_digest)
    await record("succeeded", f"version {deployment.version} is running")
    await _remove_retired(run)
    log.info("deployment.succeeded")
    return DeploymentStatus.SUCCEEDED.value


async def _finish_unchanged(context: WorkerContext, deployment: Deployment, live: Deployment) -> None:
    """End a deployment that would change nothing: the live deployment's containers serve it from now on."""
    record = EventRecorder(context.sessionmaker, deployment.id)
    await record(
        "unchanged",
        f"nothing changed: the live version {live.version} already runs this spec ({deployment.checksum[:12]}) and "
        f"image {live.image_digest}, and its containers are healthy, so they keep serving. Send the deploy request "
        'with "force": true to run it anyway',
    )
    await _succeed(
        context, deployment.id, deployment.project_id, live.image_digest, reused_from=live.container_owner
    )
    await record("succeeded", f"version {deployment.version} is running on the live containers")


async def _finish_despite_cancellation(context: WorkerContext, cleanup) -> None:
    """Await `cleanup` to the end, even when the task is cancelled again meanwhile."""
    task = asyncio.ensure_future(cleanup)
    context.cleanups.add(task)
    task.add_done_callback(context.cleanups.discard)
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            logger.warning("deployment.cleanup_continues_after_cancel")
    task.result()


async def _load_secrets(context: WorkerContext, spec_id: uuid.UUID, plan: DeploymentPlan) -> dict[str, SecretStr]:
    environment = plan.service_spec.get("environment")
    if not isinstance(environment, dict):
        environment = {}
    async with context.sessionmaker() as session:
        return await load_spec_secrets(session, spec_id, environment, context.settings.secret_key)


async def _end(context: WorkerContext, run: DeploymentRun, status: DeploymentStatus, reason: str) -> None:
    """Record a failed or rolled-back outcome after removing every container this run created."""
    try:
        await remove_containers(run, run.created)
    except EngineError as error:
        logger.warning("deployment.cleanup_failed", deployment_id=str(run.plan.deployment_id), error=str(error))
    await run.record(status.value, reason, None)
    await _set_status(
        context.sessionmaker,
        run.plan.deployment_id,
        status,
        error=reason,
        finished_at=func.now(),
        image_digest=run.image_digest,
    )
    await notify_final_state(context, run.plan.deployment_id)
    await prune(context, run.plan.project_id)


async def _remove_retired(run: DeploymentRun) -> None:
    """Remove the earlier versions' containers; one left behind by a failure here is an orphan for recovery."""
    try:
        await remove_containers(run, [container.id for container in run.retired])
    except EngineError as error:
        logger.warning("deployment.retire_failed", deployment_id=str(run.plan.deployment_id), error=str(error))
        return
    if run.retired:
        await run.record("removed_old", f"removed {len(run.retired)} container(s) of earlier versions", None)


async def _succeed(
    context: WorkerContext,
    deployment_id: uuid.UUID,
    project_id: uuid.UUID,
    image_digest: str | None,
    *,
    reused_from: uuid.UUID | None = None,
) -> None:
    """Mark the deployment succeeded and every earlier live deployment of the project superseded."""
    async with context.sessionmaker() as session:
        await session.execute(
            update(Deployment)
            .where(
                Deployment.project_id == project_id,
                Deployment.id != deployment_id,
                Deployment.status == DeploymentStatus.SUCCEEDED.value,
            )
            .values(status=DeploymentStatus.SUPERSEDED.value)
        )
        await session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id)
            .values(
                status=DeploymentStatus.SUCCEEDED.value,
                finished_at=func.now(),
                error=None,
                image_digest=image_digest,
                reused_from=reused_from,
            )
        )
        await session.commit()
    await notify_final_state(context, deployment_id)
    await prune(context, project_id)


async def prune(context: WorkerContext, project_id: uuid.UUID) -> None:
    """Apply retention to the project; a failure here is logged and never changes the deployment's outcome."""
    try:
        await prune_project(context.sessionmaker, project_id, context.settings.retain_deployments)
    except Exception as error:  # noqa: BLE001  (retention runs again after the next deployment)
        logger.warning("retention.failed", project_id=str(project_id), error=str(error))


async def stop_deployment(context: WorkerContext, deployment_id: uuid.UUID) -> str:
    """Stop and remove a deployment's containers and mark it `stopped`."""
    async with context.sessionmaker() as session:
        deployment, project, _ = await _load(session, deployment_id)
    log = logger.bind(deployment_id=str(deployment_id), project=project.name)

    async with project_lock(context.db_engine, project.id):
        async with context.sessionmaker() as session:
            status = DeploymentStatus(await session.scalar(select(Deployment.status).where(Deployment.id == deployment_id)))
        if status != DeploymentStatus.SUCCEEDED:
            log.info("deployment.stop_skipped", status=status.value)
            return status.value

        record = EventRecorder(context.sessionmaker, deployment_id)
        owner = deployment.container_owner
        route = await context.router.route_of(project.id)
        if route is not None and route.deployment_id in (deployment_id, owner):
            # Take the route away first, so no request is sent to a container that is stopping.
            await context.router.remove(project.id, project.name)
            await record("route_removed", "route removed from the proxy")
        containers = await context.engine.list_containers({naming.LABEL_DEPLOYMENT: str(owner)})
        for container in containers:
            await context.engine.stop(container.id, context.settings.stop_timeout)
            await context.engine.remove(container.id)
        await record("stopped", f"stopped and removed {len(containers)} container(s)")
        await _set_status(context.sessionmaker, deployment_id, DeploymentStatus.STOPPED, finished_at=func.now())
        await notify_final_state(context, deployment_id)
        log.info("deployment.stopped", containers=len(containers))
        return DeploymentStatus.STOPPED.value
