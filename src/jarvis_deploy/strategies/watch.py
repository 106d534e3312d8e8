"""The watch window after a switch: roll back to the old containers if the new ones turn unhealthy."""

from jarvis_deploy.engine.docker import ContainerInfo
from jarvis_deploy.engine.health import watch
from jarvis_deploy.strategies.base import (
    DeploymentFailed,
    DeploymentRolledBack,
    DeploymentRun,
    remove_containers,
    restore,
)


async def watch_and_finish(run: DeploymentRun, new_ids: list[str], old: list[ContainerInfo]) -> None:
    """Watch the new containers, then retire the old ones; on trouble, send traffic back to the old ones."""
    seconds = run.options.watch_seconds
    if seconds > 0:
        await run.record("watching", f"watching the new version for {seconds:g}s", None)
        problem = await watch(run.engine, new_ids, run.plan.port, run.plan.healthcheck, seconds)
        if problem is not None:
            if not old:
                if run.routed and run.router is not None:
                    await run.router.remove(run.plan.project_id, run.plan.project)
                await remove_containers(run, run.created)
                raise DeploymentFailed(f"{problem}. There was no previous version to go back to")
            await restore(run, old, problem)
            raise DeploymentRolledBack(problem)

    run.retire(old)
