"""Rolling: replace containers a batch at a time, so the route never has fewer upstreams than before."""

import time

from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    bring_into_service,
    drain_and_stop,
    prepare,
    restore,
    start_replica,
    switch_to,
    wait_healthy,
)
from jarvis_deploy.strategies.watch import watch_and_finish


class RollingStrategy:
    name = "rolling"

    async def deploy(self, run: DeploymentRun) -> None:
        plan = run.plan
        old = await prepare(run)
        serving = [container for container in old if container.state == "running"]
        new_ids: list[str] = []
        parallelism = max(1, int(plan.extension.get("parallelism", 1)))

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

            # Add the batch to the upstreams first, then take as many old containers out.
            new_ids.extend(container.id for container in batch)
            await bring_into_service(run, batch, [container.id for container in serving] + new_ids, time.monotonic())
            leaving, serving = serving[: len(batch)], serving[len(batch) :]
            if leaving:
                await switch_to(run, [container.id for container in serving] + new_ids)
                await drain_and_stop(run, leaving)

        # Old containers beyond the new replica count leave last.
        if serving:
            await switch_to(run, new_ids)
            await drain_and_stop(run, serving)
        await watch_and_finish(run, new_ids, old)
