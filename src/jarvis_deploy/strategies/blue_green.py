"""Blue-green: start the new version beside the live one, switch all traffic at once when it is healthy."""

import time

from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    bring_into_service,
    drain_and_stop,
    next_color,
    prepare,
    remove_containers,
    start_replica,
    wait_healthy,
)
from jarvis_deploy.strategies.watch import watch_and_finish


class BlueGreenStrategy:
    name = "blue-green"

    async def deploy(self, run: DeploymentRun) -> None:
        old = await prepare(run)
        live = [container for container in old if container.state == "running"]
        color = next_color(live)

        # Start the whole new version beside the live one, which is not touched until the new one is healthy.
        new = []
        try:
            for replica in range(1, run.plan.replicas + 1):
                container = await start_replica(run, replica, color)
                new.append(container)
                await wait_healthy(run, container)
        except (EngineError, HealthCheckFailed) as error:
            await remove_containers(run, run.created)
            raise DeploymentFailed(f"{error}. The previous version kept serving") from error

        # One route change moves every new request to the new color.
        await bring_into_service(run, new, [container.id for container in new], time.monotonic())

        await drain_and_stop(run, live)
        await watch_and_finish(run, [container.id for container in new], old)
