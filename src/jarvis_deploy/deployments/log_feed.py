"""Container logs of a deployment: recent lines with optional `since` and timestamps, and followed lines."""

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Literal

import aiodocker
import aiohttp
import structlog
from aiodocker.exceptions import DockerError
from pydantic import BaseModel, Field

from jarvis_deploy.engine.docker import (
    LOG_SEGMENT,
    ContainerInfo,
    DockerEngine,
    LogEntry,
    LogStream,
    parse_docker_timestamp,
)
from jarvis_deploy.engine.errors import EngineError
from jarvis_deploy.errors import DependencyUnavailable, InvalidRequest
from jarvis_deploy.naming import LABEL_DEPLOYMENT

logger = structlog.get_logger(__name__)

UNIX_SECONDS = re.compile(r"\d{1,12}(\.\d{1,9})?")
STREAMS: tuple[LogStream, LogStream] = ("stdout", "stderr")


class LogLineRead(BaseModel):
    container: str
    stream: Literal["stdout", "stderr"]
    text: str
    timestamp: datetime | None = Field(
        None, description="Time the Docker Engine received the line, in UTC. Present only with `timestamps=true`."
    )


class DeploymentLogsRead(BaseModel):
    deployment_id: uuid.UUID
    lines: list[LogLineRead]


def parse_since(value: str | None) -> datetime | None:
    """Parse `since`: an RFC 3339 time with a UTC offset, or Unix seconds with an optional fraction."""
    if value is None:
        return None
    field = ("query", "since")
    if UNIX_SECONDS.fullmatch(value):
        return datetime.fromtimestamp(float(value), tz=UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidRequest(
            f"since {value!r} is neither an RFC 3339 time with an offset (2024-05-01T12:00:00Z) nor Unix seconds",
            field=field,
        )
    return parsed.astimezone(UTC)


def docker_since(since: datetime) -> str:
    """Format a time as the `<seconds>.<nanoseconds>` Unix time that the Docker logs API reads."""
    delta = since - datetime(1970, 1, 1, tzinfo=UTC)
    seconds = delta.days * 86400 + delta.seconds
    return f"{seconds}.{delta.microseconds * 1000:09d}"


def to_line(container: str, entry: LogEntry, timestamps: bool) -> LogLineRead:
    return LogLineRead(
        container=container, stream=entry.stream, text=entry.text, timestamp=entry.timestamp if timestamps else None
    )


async def deployment_containers(engine: DockerEngine, deployment_id: uuid.UUID) -> list[ContainerInfo]:
    """List the deployment's containers, stopped ones too, sorted by name."""
    try:
        containers = await engine.list_containers({LABEL_DEPLOYMENT: str(deployment_id)})
    except EngineError as error:
        raise DependencyUnavailable(f"the Docker Engine did not list containers: {error}", dependency="docker") from error
    return sorted(containers, key=lambda item: item.name)


async def read_recent(
    engine: DockerEngine, deployment_id: uuid.UUID, tail: int, since: datetime | None, timestamps: bool
) -> list[LogLineRead]:
    """Return the last `tail` lines of each container written at or after `since`, oldest first within a container.

    The lines are cut to `tail` before the `since` filter. Lines are ordered by time, so the result
    equals the last `tail` lines among those at or after `since`.
    """
    lines: list[LogLineRead] = []
    for container in await deployment_containers(engine, deployment_id):
        try:
            entries = await engine.logs(container.id, tail)
        except EngineError as error:
            raise DependencyUnavailable(f"the Docker Engine did not return logs: {error}", dependency="docker") from error
        for entry in entries:
            if since is None or entry.timestamp >= since:
                lines.append(to_line(container.name, entry, timestamps))
    return lines


class LogLineAssembler:
    """Turn the chunks of one followed log stream, read with timestamps, into entries.

    Each chunk is one frame of the Engine's multiplexed stream. The json-file driver splits a
    message longer than 16 KiB into parts that each have a timestamp and no line break but the
    last, so a part is held until the part that ends the line arrives.
    """

    def __init__(self, stream: LogStream) -> None:
        self.stream = stream
        self.pending: LogEntry | None = None

    def feed(self, chunk: str) -> list[LogEntry]:
        complete: list[LogEntry] = []
        for segment in LOG_SEGMENT.findall(chunk):
            raw_timestamp, _, text = segment.partition(" ")
            ends_line = text.endswith("\n")
            if ends_line:
                text = text.removesuffix("\n").removesuffix("\r")
            if self.pending is not None:
                pending = self.pending
                self.pending = LogEntry(self.stream, pending.timestamp, pending.text + text, pending.nanoseconds)
            else:
                timestamp, nanoseconds = parse_docker_timestamp(raw_timestamp)
                self.pending = LogEntry(self.stream, timestamp, text, nanoseconds)
            if ends_line:
                complete.append(self.pending)
                self.pending = None
        return complete

    def flush(self) -> LogEntry | None:
        """Return the unfinished last line, if any, when the stream ends."""
        pending, self.pending = self.pending, None
        return pending


# Put on the queue by a reader when its stream ended, so the merger can count finished readers.
_READER_DONE = object()


async def _read_followed_stream(
    docker: aiodocker.Docker,
    container: ContainerInfo,
    stream: LogStream,
    queue: asyncio.Queue,
    tail: int,
    since: datetime | None,
    timestamps: bool,
) -> None:
    """Put each line of one container's stdout or stderr on the queue until the container stops."""
    params: dict[str, str] = {"tail": str(tail)}
    if since is not None:
        params["since"] = docker_since(since)
    assembler = LogLineAssembler(stream)
    log = logger.bind(container=container.name, stream=stream)
    try:
        chunks = docker.containers.container(container.id).log(
            stdout=stream == "stdout", stderr=stream == "stderr", follow=True, timestamps=True, **params
        )
        async for chunk in chunks:
            for entry in assembler.feed(chunk):
                await queue.put(to_line(container.name, entry, timestamps))
        last = assembler.flush()
        if last is not None:
            await queue.put(to_line(container.name, last, timestamps))
    except DockerError as error:
        if error.status == 404:
            log.info("log_follow.container_gone")
        else:
            log.warning("log_follow.failed", status=error.status, error=error.message)
    except (aiohttp.ClientError, EngineError) as error:
        log.warning("log_follow.failed", error=str(error))
    except Exception:  # noqa: BLE001  (one broken stream must not end the others; the error is logged)
        log.exception("log_follow.failed")
    await queue.put(_READER_DONE)


async def follow_lines(
    docker_url: str,
    containers: list[ContainerInfo],
    *,
    tail: int,
    since: datetime | None,
    timestamps: bool,
    queue_lines: int,
    max_seconds: float,
) -> AsyncIterator[LogLineRead]:
    """Yield the lines of every container as they are written, until every container stopped.

    Each container's stdout and stderr are read by a task of their own, because the Engine's
    multiplexed stream loses the stream name in aiodocker. The tasks put lines on a queue of
    `queue_lines` entries, so a slow client pauses the reads instead of growing a buffer. Ending
    the generator (client gone, or `max_seconds` passed) cancels the reads.
    """
    # A Docker client of its own, so these long requests take no connection from the shared
    # client's pool (aiohttp's default limit is 100 connections per connector).
    docker = aiodocker.Docker(url=docker_url)
    queue: asyncio.Queue = asyncio.Queue(maxsize=queue_lines)
    readers = [
        asyncio.create_task(_read_followed_stream(docker, container, stream, queue, tail, since, timestamps))
        for container in containers
        for stream in STREAMS
    ]
    running = len(readers)
    deadline = asyncio.get_running_loop().time() + max_seconds
    try:
        while running:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await queue.get()
            except TimeoutError:
                logger.info("log_follow.time_limit", containers=[container.name for container in containers])
                return
            if item is _READER_DONE:
                running -= 1
                continue
            yield item
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await docker.close()
