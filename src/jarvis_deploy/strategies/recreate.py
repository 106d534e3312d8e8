"""Recreate: stop the old containers, then start the new ones. Requests get no answer in between."""

import time

import structlog

from jarvis_deploy import naming
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    elapsed_ms,
    ensure_image,
    ensure_networks_and_volumes,
    project_containers,
    remove_containers,
    start_replica,
    wait_healthy,
)

logger = structlog.get_logger(__name__)


class RecreateStrategy:
    name = "recreate"

    async def deploy(self, run: DeploymentRun) -> None:
        plan = run.plan

        # Prepare everything that does not touch the running version first.
        await ensure_image(run)
        await ensure_networks_and_volumes(run)

        # Stop (but keep) the old containers, so they can come back if the new version fails.
        old = [
            container
            for container in await project_containers(run.engine, plan.project)
            if container.labels.get(naming.LABEL_DEPLOYMENT) != str(plan.deployment_id)
        ]
        running_old = [container for container in old if container.state == "running"]
        started = time.monotonic()
        for container in running_old:
            await run.engine.stop(container.id, run.stop_timeout)
        if running_old:
            names = ", ".join(container.name for container in running_old)
            await run.record("stopped_old", f"stopped {names}", elapsed_ms(started))

        try:
            for replica in range(1, plan.replicas + 1):
                container_id = await start_replica(run, replica)
                await wait_healthy(run, container_id, naming.container_name(plan.project, plan.version, replica))
        except (EngineError, HealthCheckFailed) as error:
            await self._restore(run, running_old)
            raise DeploymentFailed(str(error)) from error

        await remove_containers(run, [container.id for container in old])
        if old:
            await run.record("removed_old", f"removed {len(old)} container(s) of earlier versions", None)

    async def _restore(self, run: DeploymentRun, running_old) -> None:
        """Remove the new containers and start the old ones again."""
        await remove_containers(run, run.created)
        for container in running_old:
            try:
                await run.engine.start(container.id)
            except EngineError as error:
                logger.warning(
                    "container.restart_failed",
                    deployment_id=str(run.plan.deployment_id),
                    container=container.name,
                    error=str(error),
                )
        if running_old:
            await run.record("restored", f"restarted {len(running_old)} container(s) of the previous version", None)
