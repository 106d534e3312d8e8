"""Rolling: replace containers a batch at a time, so the route always holds at least the old count."""

import time

from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    drain_and_stop,
    ensure_image,
    ensure_networks_and_volumes,
    join_proxy,
    previous_containers,
    restore,
    start_replica,
    switch_to,
    wait_healthy,
)
from jarvis_deploy.strategies.watch import watch_and_finish

PARALLELISM = 1


class RollingStrategy:
    name = "rolling"

    async def deploy(self, run: DeploymentRun) -> None:
        plan = run.plan
        await ensure_image(run)
        await ensure_networks_and_volumes(run)

        old = await previous_containers(run)
        serving = [container for container in old if container.state == "running"]
        new_ids: list[str] = []
        parallelism = max(1, int(plan.extension.get("parallelism", PARALLELISM)))

        for first in range(1, plan.replicas + 1, parallelism):
            batch_numbers = range(first, min(first + parallelism, plan.replicas + 1))
            try:
                batch = []
                for replica in batch_numbers:
                    container = await start_replica(run, replica)
                    batch.append(container)
                    await wait_healthy(run, container)
            except (EngineError, HealthCheckFailed) as error:
                await restore(run, old, str(error))
                raise DeploymentFailed(f"{error}. The previous version was restored") from error
            healthy_at = time.monotonic()

            # Add the batch to the upstreams first, then take as many old containers out.
            await join_proxy(run, batch)
            new_ids.extend(container.id for container in batch)
            await switch_to(run, [container.id for container in serving] + new_ids, started=healthy_at)
            leaving, serving = serving[: len(batch)], serving[len(batch) :]
            if leaving:
                await switch_to(run, [container.id for container in serving] + new_ids)
                await drain_and_stop(run, leaving)

        # Old containers beyond the new replica count leave last.
        if serving:
            await switch_to(run, new_ids)
            await drain_and_stop(run, serving)
        await watch_and_finish(run, new_ids, old)
