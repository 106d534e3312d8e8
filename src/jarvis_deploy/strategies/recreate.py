"""Recreate: stop the old containers, then start the new ones. Requests fail in between."""

import time

from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRun,
    bring_into_service,
    elapsed_ms,
    prepare,
    restore,
    start_replica,
    wait_healthy,
)
from jarvis_deploy.strategies.ports import check_host_ports_free


class RecreateStrategy:
    name = "recreate"

    async def deploy(self, run: DeploymentRun) -> None:
        plan = run.plan

        # Prepare everything that does not touch the running version first.
        old = await prepare(run)
        await check_host_ports_free(run, old)

        # Stop (but keep) the old containers, so they can come back if the new version fails.
        running_old = [container for container in old if container.state == "running"]
        started = time.monotonic()
        for container in running_old:
            await run.engine.stop(container.id, run.options.stop_timeout)
        if running_old:
            names = ", ".join(container.name for container in running_old)
            await run.record("stopped_old", f"stopped {names}", elapsed_ms(started))

        new = []
        try:
            for replica in range(1, plan.replicas + 1):
                container = await start_replica(run, replica)
                new.append(container)
                await wait_healthy(run, container)
            await bring_into_service(run, new, [container.id for container in new], time.monotonic())
        except (EngineError, HealthCheckFailed) as error:
            await restore(run, running_old, str(error), remove_new_first=True)
            raise DeploymentFailed(str(error)) from error

        run.retire(old)
