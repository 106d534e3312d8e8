"""Blue-green: start the new version beside the live one, switch all traffic at once when it is healthy."""

import time

from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    drain_and_stop,
    ensure_image,
    ensure_networks_and_volumes,
    join_proxy,
    next_color,
    previous_containers,
    remove_containers,
    start_replica,
    switch_to,
    wait_healthy,
)
from jarvis_deploy.strategies.watch import watch_and_finish


class BlueGreenStrategy:
    name = "blue-green"

    async def deploy(self, run: DeploymentRun) -> None:
        plan = run.plan
        await ensure_image(run)
        await ensure_networks_and_volumes(run)

        old = await previous_containers(run)
        live = [container for container in old if container.state == "running"]
        color = next_color(live)

        # Start the whole new version beside the live one; the live one is not touched until it is healthy.
        new = []
        try:
            for replica in range(1, plan.replicas + 1):
                container = await start_replica(run, replica, color)
                new.append(container)
                await wait_healthy(run, container)
        except (EngineError, HealthCheckFailed) as error:
            await remove_containers(run, run.created)
            raise DeploymentFailed(f"{error}. The previous version kept serving") from error
        healthy_at = time.monotonic()

        # One route change moves every new request to the new color.
        await join_proxy(run, new)
        await switch_to(run, [container.id for container in new], started=healthy_at)

        await drain_and_stop(run, live)
        await watch_and_finish(run, [container.id for container in new], old)
