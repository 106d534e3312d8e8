"""What a strategy gets to work with, and the steps every strategy shares."""

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from jarvis_deploy import naming
from jarvis_deploy.compose.render import unescape_document
from jarvis_deploy.deployments.schemas import HealthCheck
from jarvis_deploy.engine.docker import ContainerInfo, DockerEngine
from jarvis_deploy.engine.health import wait_until_healthy
from jarvis_deploy.engine.translate import compose_labels, container_config

logger = structlog.get_logger(__name__)

RecordEvent = Callable[[str, str, int | None], Awaitable[None]]


class DeploymentFailed(Exception):
    """A deployment step failed; the message is the reason stored on the deployment."""


@dataclass
class DeploymentPlan:
    """Everything a strategy needs to know about the deployment it carries out."""

    deployment_id: uuid.UUID
    project: str
    version: int
    checksum: str
    document: dict[str, Any]

    @property
    def service(self) -> str:
        return self.project

    @property
    def service_spec(self) -> dict[str, Any]:
        return self.document["services"][self.service]

    @property
    def extension(self) -> dict[str, Any]:
        return unescape_document(self.service_spec.get("x-jarvis", {}))

    @property
    def image_ref(self) -> str:
        return unescape_document(self.service_spec["image"])

    @property
    def port(self) -> int:
        return int(self.extension["port"])

    @property
    def replicas(self) -> int:
        return int(self.extension.get("replicas", 1))

    @property
    def healthcheck(self) -> HealthCheck | None:
        raw = self.extension.get("healthcheck")
        return HealthCheck.model_validate(raw) if raw else None

    def labels(self, replica: int) -> dict[str, str]:
        labels = compose_labels(self.project, self.service, replica, self.checksum)
        labels.update(
            {
                naming.LABEL_MANAGED: "true",
                naming.LABEL_PROJECT: self.project,
                naming.LABEL_DEPLOYMENT: str(self.deployment_id),
                naming.LABEL_VERSION: str(self.version),
            }
        )
        return labels


@dataclass
class DeploymentRun:
    plan: DeploymentPlan
    engine: DockerEngine
    record: RecordEvent
    stop_timeout: int
    created: list[str] = field(default_factory=list)


class Strategy(Protocol):
    name: str

    async def deploy(self, run: DeploymentRun) -> None: ...


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def ensure_image(run: DeploymentRun) -> None:
    """Pull the image unless the engine has it already."""
    image = run.plan.image_ref
    if await run.engine.image_present(image):
        await run.record("pull", f"image {image} is present; not pulled", None)
        return

    started = time.monotonic()
    await run.record("pulling", f"pulling {image}", None)
    await run.engine.pull(image)
    await run.record("pulled", f"pulled {image}", elapsed_ms(started))


async def ensure_networks_and_volumes(run: DeploymentRun) -> None:
    labels = {naming.LABEL_MANAGED: "true", naming.LABEL_PROJECT: run.plan.project}
    for key, network in sorted(run.plan.document.get("networks", {}).items()):
        name = unescape_document(network.get("name", key))
        await run.engine.ensure_network(name, {**labels, naming.COMPOSE_NETWORK: key})
    for key, volume in sorted(run.plan.document.get("volumes", {}).items()):
        name = unescape_document(volume.get("name", key))
        await run.engine.ensure_volume(name, {**labels, naming.COMPOSE_VOLUME: key})


async def start_replica(run: DeploymentRun, replica: int) -> str:
    """Create and start one container of the new version; returns its id."""
    plan = run.plan
    name = naming.container_name(plan.project, plan.version, replica)
    container_plan = container_config(plan.document, plan.service, plan.labels(replica))

    container_id = await run.engine.create_container(name, container_plan)
    run.created.append(container_id)
    await run.engine.connect_networks(container_id, container_plan)
    await run.engine.start(container_id)
    await run.record("started", f"container {name} started", None)
    logger.info("container.started", deployment_id=str(plan.deployment_id), container=name, container_id=container_id)
    return container_id


async def wait_healthy(run: DeploymentRun, container_id: str, name: str) -> None:
    started = time.monotonic()
    report = await wait_until_healthy(run.engine, container_id, run.plan.port, run.plan.healthcheck)
    await run.record("healthy", f"container {name} healthy after {report.probes} probes", elapsed_ms(started))


async def remove_containers(run: DeploymentRun, containers: list[str]) -> None:
    for container_id in containers:
        await run.engine.remove(container_id)


async def project_containers(engine: DockerEngine, project: str) -> list[ContainerInfo]:
    return await engine.list_containers({naming.LABEL_MANAGED: "true", naming.LABEL_PROJECT: project})
