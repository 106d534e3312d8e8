"""Docker Engine client of the service: a thin layer over aiodocker that raises the service's own errors."""

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import aiodocker
import aiohttp
import structlog
from aiodocker.exceptions import DockerError
from aiodocker.networks import DockerNetwork
from aiodocker.volumes import DockerVolume

from jarvis_deploy import naming
from jarvis_deploy.engine.errors import (
    ContainerNameConflict,
    ContainerNotFound,
    EngineError,
    ImagePullError,
)
from jarvis_deploy.engine.translate import ContainerPlan, NetworkAttachment

log = structlog.get_logger(__name__)

LogStream = Literal["stdout", "stderr"]
LOG_SEGMENT = re.compile(r"[^\n]*\n|[^\n]+")
DOCKER_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: dict[str, str]
    state: str
    status: str


@dataclass(frozen=True)
class LogEntry:
    """One log line of a container; `text` has neither the timestamp nor the line break."""

    stream: LogStream
    timestamp: datetime
    text: str
    # Docker's timestamps have nanoseconds and datetime has microseconds; this keeps the order exact.
    nanoseconds: int = 0


class DockerEngine:
    """One connection to the Docker Engine API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._docker = aiodocker.Docker(url=url)
        # Serializes network creation within this process; across processes see ensure_network.
        self._network_lock = asyncio.Lock()

    async def __aenter__(self) -> "DockerEngine":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._docker.close()

    async def ping(self) -> None:
        async with _engine_errors(f"connecting to the Docker Engine at {self.url}"):
            await self._docker.version()

    async def image_present(self, ref: str) -> bool:
        try:
            await self._docker.images.inspect(ref)
        except DockerError as error:
            if error.status == 404:
                return False
            raise EngineError(f"inspecting image {ref} failed: {error.message}", status=error.status) from error
        except aiohttp.ClientError as error:
            raise EngineError(f"inspecting image {ref} failed: {error}") from error
        return True

    async def repo_digest(self, ref: str) -> str | None:
        """Return the image's registry digest reference (`repository@sha256:...`), or None for a local-only image."""
        async with _engine_errors(f"inspecting image {ref}"):
            info = await self._docker.images.inspect(ref)
        digests = info.get("RepoDigests") or []
        repository = ref.split("@", 1)[0]
        last_part = repository.rsplit("/", 1)[-1]
        if ":" in last_part:
            repository = repository.rsplit(":", 1)[0]
        for digest in digests:
            if digest.split("@", 1)[0] == repository:
                return digest
        return digests[0] if digests else None

    async def registry_digest(self, ref: str) -> str | None:
        """Ask the image's registry which manifest digest (`sha256:...`) the reference names now, without pulling.

        Returns None when the registry does not respond with a digest (unreachable, unknown image, no credentials),
        so the caller can fall back on the local image or let the pull report the error.
        """
        # NOTE: aiodocker 0.27 has no call for the distribution endpoint, so this uses its private _query_json.
        try:
            info = await self._docker._query_json(f"distribution/{ref}/json")
        except (DockerError, aiohttp.ClientError, asyncio.TimeoutError) as error:
            log.info("image.registry_unanswered", image=ref, error=str(error))
            return None
        digest = (info.get("Descriptor") or {}).get("digest")
        return digest if isinstance(digest, str) and digest.startswith("sha256:") else None

    async def local_digests(self, ref: str) -> list[str] | None:
        """Return the manifest digests (`sha256:...`) the local image was pulled by, or None when it is absent."""
        try:
            info = await self._docker.images.inspect(ref)
        except DockerError as error:
            if error.status == 404:
                return None
            raise EngineError(f"inspecting image {ref} failed: {error.message}", status=error.status) from error
        except aiohttp.ClientError as error:
            raise EngineError(f"inspecting image {ref} failed: {error}") from error
        return [digest.split("@", 1)[1] for digest in info.get("RepoDigests") or [] if "@" in digest]

    async def pull(self, ref: str) -> str:
        """Pull an image and return its id.

        The Engine reports some registry errors inside the progress stream after an HTTP 200,
        so every chunk is checked, not only the status.
        """
        started = time.monotonic()
        log.info("image.pull_started", image=ref)
        try:
            image_id = await self._pull(ref)
        except ImagePullError as error:
            log.warning("image.pull_failed", image=ref, error=error.message)
            raise
        log.info("image.pulled", image=ref, image_id=image_id, seconds=round(time.monotonic() - started, 3))
        return image_id

    async def _pull(self, ref: str) -> str:
        try:
            stream = self._docker.images.pull(ref, stream=True)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    detail = chunk.get("errorDetail")
                    error = (detail.get("message") if isinstance(detail, dict) else None) or chunk.get("error")
                    if error:
                        raise ImagePullError(ref, f"pulling image {ref} failed: {error}")
            image = await self._docker.images.inspect(ref)
        except DockerError as error:
            raise ImagePullError(ref, f"pulling image {ref} failed: {error.message}", status=error.status) from error
        except aiohttp.ClientError as error:
            raise ImagePullError(ref, f"pulling image {ref} failed: {error}") from error
        return image["Id"]

    async def ensure_network(self, name: str, labels: dict[str, str]) -> str:
        """Create the network unless it exists, and return its id.

        The labels apply only when this call creates the network. Docker 20.10 does not make
        CheckDuplicate atomic, so concurrent creates from several processes can all succeed.
        Every caller therefore settles on the oldest network of that name and removes its own
        duplicate.
        """
        async with self._network_lock:
            existing = await self._find_network(name)
            if existing is not None:
                return existing

            config = {"Name": name, "Driver": "bridge", "Labels": labels, "CheckDuplicate": True}
            try:
                network = await self._docker.networks.create(config)
            except DockerError as error:
                existing = await self._find_network(name) if error.status == 409 else None
                if existing is None:
                    message = f"creating network {name} failed: {error.message}"
                    raise EngineError(message, status=error.status) from error
                log.info("network.create_race", network=name, network_id=existing)
                return existing

            oldest = await self._find_network(name)
            if oldest is not None and oldest != network.id:
                async with _engine_errors(f"removing duplicate network {name}"):
                    await network.delete()
                log.info("network.duplicate_removed", network=name, network_id=network.id, kept=oldest)
                return oldest
            log.info("network.created", network=name, network_id=network.id)
            return network.id

    async def _find_network(self, name: str) -> str | None:
        """Return the id of the oldest network named `name`, or None."""
        # The name filter matches substrings, so the name is compared afterwards.
        async with _engine_errors(f"looking up network {name}"):
            networks = await self._docker.networks.list(filters={"name": [name]})
        matching = [network for network in networks if network["Name"] == name]
        if not matching:
            return None
        oldest = min(matching, key=lambda network: (parse_docker_timestamp(network["Created"]), network["Id"]))
        return oldest["Id"]

    async def list_networks(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """List the networks that carry every label given, as the Engine describes them (`Id`, `Name`, `Labels`)."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        async with _engine_errors("listing networks"):
            return await self._docker.networks.list(filters=filters)

    async def remove_network(self, network_id: str) -> bool:
        """Remove a network; returns False when it is gone already or containers still use it."""
        try:
            await DockerNetwork(self._docker, network_id).delete()
        except DockerError as error:
            if error.status in (403, 404, 409):
                log.info("network.not_removed", network_id=network_id, reason=error.message)
                return False
            raise EngineError(f"removing network {network_id} failed: {error.message}", status=error.status) from error
        except aiohttp.ClientError as error:
            raise EngineError(f"removing network {network_id} failed: {error}") from error
        log.info("network.removed", network_id=network_id)
        return True

    async def list_volumes(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """List the volumes that carry every label given (`Name`, `Labels`)."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        async with _engine_errors("listing volumes"):
            response = await self._docker.volumes.list(filters=filters)
        return response.get("Volumes") or []

    async def remove_volume(self, name: str) -> bool:
        """Remove a volume and its data; returns False when it is gone already or a container uses it."""
        try:
            await DockerVolume(self._docker, name).delete()
        except DockerError as error:
            if error.status in (404, 409):
                log.info("volume.not_removed", volume=name, reason=error.message)
                return False
            raise EngineError(f"removing volume {name} failed: {error.message}", status=error.status) from error
        except aiohttp.ClientError as error:
            raise EngineError(f"removing volume {name} failed: {error}") from error
        log.info("volume.removed", volume=name)
        return True

    async def ensure_volume(self, name: str, labels: dict[str, str]) -> str:
        """Create the volume unless it exists, and return its name.

        Docker's volume create returns an existing local volume unchanged, labels included.
        """
        async with _engine_errors(f"creating volume {name}"):
            volume = await self._docker.volumes.create({"Name": name, "Driver": "local", "Labels": labels})
        log.info("volume.ensured", volume=name)
        return volume.name

    async def create_container(self, name: str, plan: ContainerPlan) -> str:
        """Create a container and return its id.

        When a container of that name exists and carries the same deployment label as the plan,
        its id is returned, so that a rerun of the same deployment step continues with it.
        Raises ContainerNameConflict when the existing container belongs to something else.
        """
        try:
            container = await self._docker.containers.create(plan.body, name=name)
        except DockerError as error:
            if error.status != 409:
                raise EngineError(f"creating container {name} failed: {error.message}", status=error.status) from error
            return await self._reuse_container(name, plan, error.message)
        log.info("container.created", container=name, container_id=container.id, image=plan.body.get("Image"))
        return container.id

    async def _reuse_container(self, name: str, plan: ContainerPlan, conflict: str) -> str:
        existing = await self.inspect(name)
        deployment = plan.body.get("Labels", {}).get(naming.LABEL_DEPLOYMENT)
        existing_deployment = (existing["Config"].get("Labels") or {}).get(naming.LABEL_DEPLOYMENT)
        if deployment is None or existing_deployment != deployment:
            raise ContainerNameConflict(
                name,
                existing["Id"],
                f"creating container {name} failed: {conflict}. It belongs to deployment "
                f"{existing_deployment or 'none'}, not {deployment or 'none'}. Remove it or choose another name",
            )
        log.info("container.reused", container=name, container_id=existing["Id"], deployment=deployment)
        return existing["Id"]

    async def connect_networks(self, container_id: str, networks: ContainerPlan | Iterable[NetworkAttachment]) -> None:
        """Connect the container to each further network of the plan that it is not yet on, with its aliases."""
        attachments = networks.networks if isinstance(networks, ContainerPlan) else list(networks)
        if not attachments:
            return
        info = await self.inspect(container_id)
        attached = set((info.get("NetworkSettings") or {}).get("Networks") or {})
        for attachment in attachments:
            if attachment.name in attached:
                continue
            async with _engine_errors(f"connecting container {container_id} to network {attachment.name}"):
                network = await self._docker.networks.get(attachment.name)
                await network.connect({"Container": container_id, "EndpointConfig": {"Aliases": attachment.aliases}})
            log.info("container.network_connected", container_id=container_id, network=attachment.name)

    async def disconnect_network(self, container_id: str, network_name: str) -> None:
        """Take the container off a network; a container that is not on it is left as it is."""
        info = await self.inspect(container_id)
        attached = set((info.get("NetworkSettings") or {}).get("Networks") or {})
        if network_name not in attached:
            return
        async with _engine_errors(f"disconnecting container {container_id} from network {network_name}"):
            network = await self._docker.networks.get(network_name)
            await network.disconnect({"Container": container_id, "Force": True})
        log.info("container.network_disconnected", container_id=container_id, network=network_name)

    async def start(self, container_id: str) -> None:
        async with _container_errors(container_id, "starting"):
            await self._docker.containers.container(container_id).start()
        log.info("container.started", container_id=container_id)

    async def stop(self, container_id: str, timeout: int) -> None:
        """Stop the container, sending SIGKILL after `timeout` seconds; a stopped container is no error."""
        async with _container_errors(container_id, "stopping"):
            await self._docker.containers.container(container_id).stop(t=timeout)
        log.info("container.stopped", container_id=container_id)

    async def remove(self, container_id: str) -> None:
        """Remove the container by force and keep its volumes; a missing container is no error."""
        try:
            await self._docker.containers.container(container_id).delete(force=True, v=False)
        except DockerError as error:
            if error.status == 404:
                log.info("container.already_removed", container_id=container_id)
                return
            if error.status == 409 and "already in progress" in error.message:
                log.info("container.removal_in_progress", container_id=container_id)
                return
            message = f"removing container {container_id} failed: {error.message}"
            raise EngineError(message, status=error.status) from error
        except aiohttp.ClientError as error:
            raise EngineError(f"removing container {container_id} failed: {error}") from error
        log.info("container.removed", container_id=container_id)

    async def list_containers(self, labels: dict[str, str], all: bool = True) -> list[ContainerInfo]:
        """List the containers that carry every label given, stopped ones too unless `all` is false."""
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        async with _engine_errors("listing containers"):
            containers = await self._docker.containers.list(all=all, filters=filters)
        result = []
        for container in containers:
            names = container["Names"] if "Names" in container else []
            result.append(
                ContainerInfo(
                    id=container.id,
                    name=names[0].lstrip("/") if names else "",
                    labels=(container["Labels"] if "Labels" in container else None) or {},
                    state=container["State"] if "State" in container else "",
                    status=container["Status"] if "Status" in container else "",
                )
            )
        return result

    async def addresses_in_use(self, label: str) -> set[str]:
        """Return the host addresses that containers publish ports on, running or not.

        A running container lists its bindings. A stopped one lists none, so its address comes from `label`.
        """
        async with _engine_errors("listing containers"):
            containers = await self._docker.containers.list(all=True)
        addresses = set()
        for container in containers:
            for port in (container["Ports"] if "Ports" in container else None) or []:
                if port.get("IP"):
                    addresses.add(port["IP"])
            labels = (container["Labels"] if "Labels" in container else None) or {}
            if labels.get(label):
                addresses.add(labels[label])
        return addresses

    async def inspect(self, container_id: str) -> dict[str, Any]:
        async with _container_errors(container_id, "inspecting"):
            return await self._docker.containers.container(container_id).show()

    async def logs(self, container_id: str, tail: int) -> list[LogEntry]:
        """Return the last `tail` log lines of stdout and stderr together, oldest first."""
        container = self._docker.containers.container(container_id)
        entries: list[LogEntry] = []
        stream: LogStream
        for stream in ("stdout", "stderr"):
            async with _container_errors(container_id, f"reading the {stream} log of"):
                chunks = await container.log(
                    stdout=stream == "stdout", stderr=stream == "stderr", timestamps=True, tail=str(tail)
                )
            entries.extend(parse_log_chunks(chunks, stream))
        entries.sort(key=lambda entry: (entry.timestamp.replace(microsecond=0), entry.nanoseconds))
        return entries[-tail:] if tail > 0 else []

    async def exit_codes(self, container_id: str, since: datetime) -> list[int]:
        """Return the exit codes of the container's `die` events since `since`, oldest first.

        A restart policy restarts a crashed container and resets State.ExitCode to 0, so the
        events are the only place that keeps the code. Docker buffers the last 1000 events.
        """
        params = {
            "since": str(int(since.timestamp())),
            "until": str(int(time.time()) + 1),
            "filters": json.dumps({"container": [container_id], "type": ["container"], "event": ["die"]}),
        }
        codes: list[int] = []
        # NOTE: aiodocker 0.27 has no call for past events, only a shared live subscription, so
        # this uses its private _query.
        async with _engine_errors(f"reading the events of container {container_id}"):
            async with self._docker._query("events", params=params) as response:
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    code = (event.get("Actor") or {}).get("Attributes", {}).get("exitCode")
                    if code is not None and code.lstrip("-").isdigit():
                        codes.append(int(code))
        return codes


def parse_log_chunks(chunks: Iterable[str], stream: LogStream) -> list[LogEntry]:
    """Parse log output fetched with timestamps into entries.

    The json-file driver splits a message longer than 16 KiB into parts that each have their
    own timestamp and no line break but the last. Those parts are joined into one entry.
    """
    entries: list[LogEntry] = []
    pending: LogEntry | None = None
    for chunk in chunks:
        # Only "\n" ends a log line; str.splitlines would also split at "\r", "\x0b" and others.
        for segment in LOG_SEGMENT.findall(chunk):
            raw_timestamp, _, text = segment.partition(" ")
            complete = text.endswith("\n")
            if complete:
                text = text.removesuffix("\n").removesuffix("\r")
            if pending is not None:
                pending = LogEntry(stream, pending.timestamp, pending.text + text, pending.nanoseconds)
            else:
                timestamp, nanoseconds = parse_docker_timestamp(raw_timestamp)
                pending = LogEntry(stream, timestamp, text, nanoseconds)
            if complete:
                entries.append(pending)
                pending = None
    if pending is not None:
        entries.append(pending)
    return entries


def parse_docker_timestamp(text: str) -> tuple[datetime, int]:
    """Parse an RFC 3339 timestamp with up to nine fractional digits; return it in UTC and its nanoseconds."""
    match = DOCKER_TIMESTAMP.fullmatch(text)
    if match is None:
        raise EngineError(f"invalid Docker timestamp {text!r}")
    seconds, fraction, offset = match.groups()
    zone = UTC if offset == "Z" else datetime.strptime(offset.replace(":", ""), "%z").tzinfo
    base = datetime.strptime(seconds, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=zone).astimezone(UTC)
    nanoseconds = int((fraction or "").ljust(9, "0")[:9])
    return base.replace(microsecond=nanoseconds // 1000), nanoseconds


@asynccontextmanager
async def _engine_errors(action: str) -> AsyncIterator[None]:
    try:
        yield
    except DockerError as error:
        raise EngineError(f"{action} failed: {error.message}", status=error.status) from error
    except aiohttp.ClientError as error:
        raise EngineError(f"{action} failed: {error}") from error


@asynccontextmanager
async def _container_errors(container_id: str, action: str) -> AsyncIterator[None]:
    try:
        yield
    except DockerError as error:
        message = f"{action} container {container_id} failed: {error.message}"
        if error.status == 404:
            raise ContainerNotFound(container_id, message) from error
        raise EngineError(message, status=error.status) from error
    except aiohttp.ClientError as error:
        raise EngineError(f"{action} container {container_id} failed: {error}") from error
