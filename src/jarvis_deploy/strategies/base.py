"""Deployment plan and run state, and the steps that every strategy shares."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import SecretStr

from jarvis_deploy import naming
from jarvis_deploy.compose.render import unescape_document
from jarvis_deploy.deployments.schemas import HealthCheck
from jarvis_deploy.engine.docker import ContainerInfo, DockerEngine
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed
from jarvis_deploy.engine.health import wait_until_healthy
from jarvis_deploy.engine.translate import (
    ContainerPlan,
    NetworkAttachment,
    compose_labels,
    container_config,
    inject_secrets,
)
from jarvis_deploy.proxy.addresses import next_upstream_address
from jarvis_deploy.proxy.routes import TrafficRouter

logger = structlog.get_logger(__name__)

RecordEvent = Callable[[str, str, int | None], Awaitable[None]]
COLORS = ("blue", "green")


class DeploymentFailed(Exception):
    """A deployment step failed; the message is the reason stored on the deployment."""


class DeploymentRolledBack(Exception):
    """The new version turned unhealthy after the switch and traffic went back to the old one."""


@dataclass
class DeploymentPlan:
    """Everything a strategy needs to know about the deployment it carries out."""

    deployment_id: uuid.UUID
    project_id: uuid.UUID
    project: str
    version: int
    checksum: str
    document: dict[str, Any]
    instance: str = ""
    # Decrypted secret values by name. The document contains only their placeholders.
    secrets: dict[str, SecretStr] = field(default_factory=dict, repr=False)

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
    def domains(self) -> list[str]:
        return list(self.extension.get("domains") or [])

    @property
    def healthcheck(self) -> HealthCheck | None:
        raw = self.extension.get("healthcheck")
        return HealthCheck.model_validate(raw) if raw else None

    def labels(self, replica: int, color: str | None) -> dict[str, str]:
        labels = compose_labels(self.project, self.service, replica, self.checksum)
        labels.update(
            {
                naming.LABEL_MANAGED: "true",
                naming.LABEL_PROJECT: self.project,
                naming.LABEL_DEPLOYMENT: str(self.deployment_id),
                naming.LABEL_VERSION: str(self.version),
                naming.LABEL_INSTANCE: self.instance,
            }
        )
        if color:
            labels[naming.LABEL_COLOR] = color
        return labels


@dataclass
class RunOptions:
    stop_timeout: int
    proxy_network: str
    upstream_mode: str
    drain_seconds: float
    watch_seconds: float
    # With Caddy's admin API the switch is an upstream change, so old containers stay on the proxy
    # network until they have drained. Without it, caddy-docker-proxy routes to whatever is on the
    # network, so old containers leave it before they drain.
    admin_api: bool
    # Loopback network that gives each routed container an address of its own, so all upstreams
    # of a project share the port and Caddy can find them by a lookup. Set only in loopback mode
    # with the admin API and the upstream resolver. None publishes on 127.0.0.1 with a port that
    # Docker picks.
    upstream_address_range: str | None = None

    @property
    def defer_proxy_network(self) -> bool:
        """Whether new containers join the proxy network only once healthy.

        caddy-docker-proxy and Caddy dialing over the network route by network membership, so a
        container joins only when it may take traffic. A Caddy on the host dialing loopback ports
        through the admin API does not, and joining a running container to a network makes
        Docker 20.10 publish its ports again on new ephemeral host ports, which would move the
        upstream after the switch. So there the container is created on the network.
        """
        return not (self.upstream_mode == "loopback" and self.admin_api)


@dataclass
class DeploymentRun:
    plan: DeploymentPlan
    engine: DockerEngine
    record: RecordEvent
    options: RunOptions
    router: TrafficRouter | None = None
    created: list[str] = field(default_factory=list)
    image_digest: str | None = None
    # Old containers to remove once the deployment is recorded as succeeded. Removing them only then
    # means a worker that dies before that point leaves the old version for recovery to bring back.
    retired: list[ContainerInfo] = field(default_factory=list)

    def retire(self, containers: list[ContainerInfo]) -> None:
        self.retired.extend(containers)

    @property
    def routed(self) -> bool:
        """Whether traffic reaches this project through the proxy (it has domains)."""
        return bool(self.plan.domains)


@dataclass
class NewContainer:
    id: str
    name: str
    deferred: list[NetworkAttachment]


class Strategy(Protocol):
    name: str

    async def deploy(self, run: DeploymentRun) -> None: ...


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def ensure_image(run: DeploymentRun) -> None:
    """Pull the image unless the engine has the manifest the registry names for it now.

    A tag may have moved since the engine pulled it, so a present image is only reused when its
    digest matches the registry's, or when the registry cannot be asked.
    """
    image = run.plan.image_ref
    current = await run.engine.registry_digest(image)
    local = await run.engine.local_digests(image)
    if local is not None and (current is None or current in local):
        source = "matches the registry" if current else "the registry did not answer, so the local image is used"
        await run.record("pull", f"image {image} is present and {source}; not pulled", None)
    else:
        started = time.monotonic()
        await run.record("pulling", f"pulling {image}", None)
        await run.engine.pull(image)
        await run.record("pulled", f"pulled {image}", elapsed_ms(started))

    # Tags move and digests do not, so a rollback can ask for exactly this image again.
    run.image_digest = await run.engine.repo_digest(image)
    if run.image_digest:
        await run.record("image", f"image digest {run.image_digest}", None)


async def ensure_networks_and_volumes(run: DeploymentRun) -> None:
    """Create the document's networks and volumes; shared (external) networks get no project label."""
    managed = {naming.LABEL_MANAGED: "true"}
    project_labels = {**managed, naming.LABEL_PROJECT: run.plan.project, naming.LABEL_INSTANCE: run.plan.instance}
    for key, network in sorted(run.plan.document.get("networks", {}).items()):
        name = unescape_document(network.get("name", key))
        labels = managed if network.get("external") else {**project_labels, naming.COMPOSE_NETWORK: key}
        await run.engine.ensure_network(name, labels)
    for key, volume in sorted(run.plan.document.get("volumes", {}).items()):
        name = unescape_document(volume.get("name", key))
        await run.engine.ensure_volume(name, {**project_labels, naming.COMPOSE_VOLUME: key})


def _defer_network(container_plan: ContainerPlan, network: str) -> tuple[ContainerPlan, list[NetworkAttachment]]:
    """Take `network` out of the plan so the container joins it only once it is healthy."""
    attachments = [NetworkAttachment(container_plan.primary_network), *container_plan.networks]
    if network not in [attachment.name for attachment in attachments]:
        return container_plan, []

    deferred = [attachment for attachment in container_plan.networks if attachment.name == network]
    if container_plan.primary_network != network:
        container_plan.networks = [attachment for attachment in container_plan.networks if attachment.name != network]
        return container_plan, deferred

    endpoint = container_plan.body["NetworkingConfig"]["EndpointsConfig"].pop(network)
    deferred = [NetworkAttachment(network, list(endpoint.get("Aliases") or []))]
    replacement, *rest = container_plan.networks
    container_plan.body["HostConfig"]["NetworkMode"] = replacement.name
    container_plan.body["NetworkingConfig"]["EndpointsConfig"][replacement.name] = {"Aliases": replacement.aliases}
    container_plan.networks = rest
    return container_plan, deferred


async def start_replica(run: DeploymentRun, replica: int, color: str | None = None) -> NewContainer:
    """Create and start one container of the new version, off the proxy network until it is healthy."""
    plan = run.plan
    name = naming.container_name(plan.project, plan.version, replica)
    container_plan = container_config(plan.document, plan.service, plan.labels(replica, color))
    inject_secrets(container_plan.body, plan.secrets)
    deferred: list[NetworkAttachment] = []
    if run.routed and run.options.defer_proxy_network:
        container_plan, deferred = _defer_network(container_plan, run.options.proxy_network)
    if run.routed and run.options.upstream_address_range and run.router:
        await _publish_on_own_address(run, container_plan, run.options.upstream_address_range)

    container_id = await run.engine.create_container(name, container_plan)
    run.created.append(container_id)
    await run.engine.connect_networks(container_id, container_plan)
    await _start_when_port_released(run, container_id)
    await run.record("started", f"container {name} started", None)
    logger.info("container.started", deployment_id=str(plan.deployment_id), container=name, container_id=container_id)
    return NewContainer(container_id, name, deferred)


async def _publish_on_own_address(run: DeploymentRun, container_plan: ContainerPlan, address_range: str) -> None:
    """Publish the container's port on a free address of `address_range`, with the same port number, in place of a port Docker picks."""
    assert run.router is not None
    in_use = await run.engine.addresses_in_use(naming.LABEL_UPSTREAM_ADDRESS)
    address = await next_upstream_address(run.router.sessionmaker, address_range, in_use)
    if address is None:
        raise DeploymentFailed(
            f"every address of JARVIS_UPSTREAM_ADDRESS_RANGE ({address_range}) is in use on this Docker host."
            " Set a larger range, such as a /16"
        )

    port = run.plan.port
    bindings = container_plan.body["HostConfig"].setdefault("PortBindings", {})
    bindings[f"{port}/tcp"] = [{"HostIp": address, "HostPort": str(port)}]
    container_plan.body.setdefault("ExposedPorts", {})[f"{port}/tcp"] = {}
    # Docker lists no bindings for a stopped container, so the label keeps its address reserved.
    container_plan.body.setdefault("Labels", {})[naming.LABEL_UPSTREAM_ADDRESS] = address


# Docker 20.10 releases a stopped container's published ports shortly after `stop` returns, so a
# new container that publishes the same port may briefly find it still allocated.
PORT_RELEASE_TIMEOUT = 5.0


async def _start_when_port_released(run: DeploymentRun, container_id: str) -> None:
    deadline = time.monotonic() + PORT_RELEASE_TIMEOUT
    while True:
        try:
            await run.engine.start(container_id)
            return
        except EngineError as error:
            if "port is already allocated" not in str(error) or time.monotonic() > deadline:
                raise
            logger.debug("container.port_still_allocated", container_id=container_id)
            await asyncio.sleep(0.1)


async def wait_healthy(run: DeploymentRun, container: NewContainer) -> None:
    started = time.monotonic()
    report = await wait_until_healthy(run.engine, container.id, run.plan.port, run.plan.healthcheck)
    await run.record("healthy", f"container {container.name} healthy after {report.probes} probes", elapsed_ms(started))


async def join_proxy(run: DeploymentRun, containers: list[NewContainer]) -> None:
    for container in containers:
        if container.deferred:
            await run.engine.connect_networks(container.id, container.deferred)


async def leave_proxy(run: DeploymentRun, container_ids: list[str]) -> None:
    if not run.routed:
        return
    for container_id in container_ids:
        await run.engine.disconnect_network(container_id, run.options.proxy_network)


async def upstream_of(run: DeploymentRun, container_id: str) -> str:
    """Address Caddy dials for a container: its published loopback port, or its name on the proxy network."""
    info = await run.engine.inspect(container_id)
    port = run.plan.port
    if run.options.upstream_mode == "loopback":
        bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp") or []
        for binding in bindings:
            if binding.get("HostPort"):
                host = binding.get("HostIp") or ""
                host = host if host.startswith("127.") else "127.0.0.1"
                return f"{host}:{binding['HostPort']}"
        raise DeploymentFailed(f"container {info.get('Name', '').lstrip('/')} has no published port for {port}/tcp")
    return f"{info['Name'].lstrip('/')}:{port}"


async def switch_to(
    run: DeploymentRun,
    container_ids: list[str],
    started: float | None = None,
    owner: uuid.UUID | None = None,
) -> None:
    """Point the project's route at exactly these containers, in one change.

    `owner` is the deployment the containers belong to, when it is not the one being run.
    """
    if not run.routed or run.router is None:
        return
    upstreams = [await upstream_of(run, container_id) for container_id in container_ids]
    seconds = await run.router.switch(
        run.plan.project_id, run.plan.project, run.plan.domains, upstreams, owner or run.plan.deployment_id
    )
    since = f" ({elapsed_ms(started)} ms after healthy)" if started is not None else ""
    await run.record("switched", f"route now sends traffic to {', '.join(upstreams)}{since}", int(seconds * 1000))


async def bring_into_service(
    run: DeploymentRun, joining: list[NewContainer], upstream_ids: list[str], healthy_at: float
) -> None:
    """Put healthy new containers on the proxy network, then route to `upstream_ids` (which includes them)."""
    await join_proxy(run, joining)
    await switch_to(run, upstream_ids, started=healthy_at)


async def drain_and_stop(run: DeploymentRun, containers: list[ContainerInfo]) -> None:
    """Let requests in flight finish on old containers, then stop them gracefully (they stay present)."""
    if not containers:
        return
    if not run.options.admin_api:
        await leave_proxy(run, [container.id for container in containers])
    if run.routed and run.options.drain_seconds:
        await run.record("draining", f"draining {len(containers)} old container(s) for {run.options.drain_seconds:g}s", None)
        await asyncio.sleep(run.options.drain_seconds)
    started = time.monotonic()
    for container in containers:
        await run.engine.stop(container.id, run.options.stop_timeout)
        if run.options.admin_api:
            await leave_proxy(run, [container.id])
    names = ", ".join(container.name for container in containers)
    await run.record("stopped_old", f"stopped {names}", elapsed_ms(started))


async def remove_containers(run: DeploymentRun, containers: list[str]) -> None:
    for container_id in containers:
        await run.engine.remove(container_id)


async def project_containers(engine: DockerEngine, project: str) -> list[ContainerInfo]:
    return await engine.list_containers({naming.LABEL_MANAGED: "true", naming.LABEL_PROJECT: project})


async def prepare(run: DeploymentRun) -> list[ContainerInfo]:
    """Pull the image, create networks and volumes, and return the containers of earlier deployments."""
    await ensure_image(run)
    await ensure_networks_and_volumes(run)
    return await previous_containers(run)


async def previous_containers(run: DeploymentRun) -> list[ContainerInfo]:
    """Containers of the project's earlier deployments, ordered by replica number."""
    containers = [
        container
        for container in await project_containers(run.engine, run.plan.project)
        if container.labels.get(naming.LABEL_DEPLOYMENT) != str(run.plan.deployment_id)
    ]
    return sorted(containers, key=lambda item: (int(item.labels.get(naming.COMPOSE_CONTAINER_NUMBER, "0")), item.name))


def next_color(live: list[ContainerInfo]) -> str:
    colors = {container.labels.get(naming.LABEL_COLOR) for container in live}
    return COLORS[1] if COLORS[0] in colors else COLORS[0]


async def restore(run: DeploymentRun, old: list[ContainerInfo], reason: str, *, remove_new_first: bool = False) -> None:
    """Bring the old containers back into service after the new version failed, and drop the new ones.

    `remove_new_first` is for recreate, whose new containers hold the host ports the old ones need.
    Otherwise the new containers go last, so the route never points at nothing.
    """
    if remove_new_first:
        await remove_containers(run, run.created)

    restored = []
    for container in old:
        try:
            info = await run.engine.inspect(container.id)
            if (info.get("State") or {}).get("Status") != "running":
                await _start_when_port_released(run, container.id)
            if run.routed:
                attachment = NetworkAttachment(run.options.proxy_network, [run.plan.service])
                await run.engine.connect_networks(container.id, [attachment])
            await wait_until_healthy(run.engine, container.id, run.plan.port, None)
        except (EngineError, HealthCheckFailed) as error:
            logger.warning(
                "container.restore_failed",
                deployment_id=str(run.plan.deployment_id),
                container=container.name,
                error=str(error),
            )
            await run.record("restore_failed", f"could not bring back {container.name}: {error}", None)
            continue
        restored.append(container)

    if restored:
        owner = restored[0].labels.get(naming.LABEL_DEPLOYMENT)
        await switch_to(run, [container.id for container in restored], owner=uuid.UUID(owner) if owner else None)
    await remove_containers(run, run.created)
    if restored:
        await run.record("restored", f"previous version serves again ({len(restored)} container(s)): {reason}", None)
