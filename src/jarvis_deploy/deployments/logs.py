"""Container logs of a deployment, read from the Docker Engine."""

import uuid

from jarvis_deploy.deployments.schemas import LogLine
from jarvis_deploy.engine.docker import DockerEngine
from jarvis_deploy.engine.errors import EngineError
from jarvis_deploy.errors import DependencyUnavailable
from jarvis_deploy.naming import LABEL_DEPLOYMENT


async def read_tail(engine: DockerEngine, deployment_id: uuid.UUID, tail: int) -> list[LogLine]:
    """Return the last `tail` lines of each of the deployment's containers, oldest first within a container."""
    try:
        containers = await engine.list_containers({LABEL_DEPLOYMENT: str(deployment_id)})
        lines: list[LogLine] = []
        for container in sorted(containers, key=lambda item: item.name):
            for entry in await engine.logs(container.id, tail):
                lines.append(LogLine(container=container.name, stream=entry.stream, text=entry.text))
    except EngineError as error:
        raise DependencyUnavailable(f"the Docker Engine did not return logs: {error}", dependency="docker") from error
    return lines
