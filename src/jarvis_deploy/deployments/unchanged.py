"""Decides whether a deployment would change nothing: same spec, same image digest, live containers healthy."""

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy import naming
from jarvis_deploy.db.models import Deployment
from jarvis_deploy.deployments.schemas import DeploymentStatus, HealthCheck
from jarvis_deploy.engine.docker import DockerEngine
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.engine.health import wait_until_healthy
from jarvis_deploy.proxy.routes import TrafficRouter
from jarvis_deploy.strategies.base import DeploymentPlan

logger = structlog.get_logger(__name__)


async def live_deployment(
    sessionmaker: async_sessionmaker[AsyncSession], deployment: Deployment
) -> Deployment | None:
    """Return the project's latest succeeded deployment other than `deployment`, or None."""
    async with sessionmaker() as session:
        return await session.scalar(
            select(Deployment)
            .where(
                Deployment.project_id == deployment.project_id,
                Deployment.id != deployment.id,
                Deployment.status == DeploymentStatus.SUCCEEDED.value,
            )
            .order_by(Deployment.version.desc())
            .limit(1)
        )


def _digest_hash(reference: str) -> str:
    return reference.rsplit("@", 1)[-1]


async def runs_digest(engine: DockerEngine, image_ref: str, digest: str) -> bool:
    """Tell whether a deployment of `image_ref` would run the manifest `digest` (`sha256:...`) now.

    The registry's digest takes precedence. When the registry cannot be reached, a deployment would run
    the local image, so its digests count.
    """
    if "@" in image_ref:
        return _digest_hash(image_ref) == digest
    current = await engine.registry_digest(image_ref)
    if current is not None:
        return current == digest
    local = await engine.local_digests(image_ref)
    return local is not None and digest in local


async def unchanged_from(
    engine: DockerEngine,
    router: TrafficRouter,
    sessionmaker: async_sessionmaker[AsyncSession],
    deployment: Deployment,
    plan: DeploymentPlan,
) -> Deployment | None:
    """Return the live deployment that already runs what `deployment` requests, or None when a run is needed."""
    log = logger.bind(deployment_id=str(deployment.id), project=plan.project)
    live = await live_deployment(sessionmaker, deployment)
    if live is None or live.checksum != deployment.checksum or live.image_digest is None:
        return None

    try:
        same_image = await runs_digest(engine, plan.image_ref, _digest_hash(live.image_digest))
    except EngineError as error:
        log.info("unchanged.digest_unknown", error=str(error))
        return None
    if not same_image:
        log.info("unchanged.image_moved", live_digest=live.image_digest)
        return None

    if plan.domains:
        route = await router.route_of(plan.project_id)
        if route is None or route.deployment_id not in (live.id, live.container_owner):
            log.info("unchanged.route_elsewhere")
            return None

    try:
        healthy = await _containers_healthy(engine, live, plan, log)
    except EngineError as error:
        log.info("unchanged.containers_unknown", error=str(error))
        return None
    return live if healthy else None


async def _containers_healthy(engine: DockerEngine, live: Deployment, plan: DeploymentPlan, log) -> bool:
    """Tell whether every replica of the live deployment runs and passes one probe of the deployment's health check."""
    containers = await engine.list_containers({naming.LABEL_DEPLOYMENT: str(live.container_owner)})
    running = [container for container in containers if container.state == "running"]
    if len(running) != plan.replicas or len(containers) != plan.replicas:
        log.info("unchanged.replicas_differ", running=len(running), containers=len(containers), wanted=plan.replicas)
        return False

    # One probe each: a container that fails it is not healthy now, and the deployment runs in full.
    configured = plan.healthcheck or HealthCheck(type="tcp")
    check = configured.model_copy(update={"retries": 1, "start_period": 0, "successes": 1})
    for container in running:
        try:
            await wait_until_healthy(engine, container.id, plan.port, check)
        except (EngineError, HealthCheckFailed) as error:
            log.info("unchanged.container_unhealthy", container=container.name, error=str(error))
            return False
    return True
