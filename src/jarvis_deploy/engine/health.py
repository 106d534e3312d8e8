"""Health gate of a new container: probes from outside the container until it passes or fails.

The test images have no curl, and a deployed image need not have one either, so the probes run
here: an HTTP GET with httpx, or a TCP connect.
"""

import asyncio
import inspect as inspection
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from jarvis_deploy.deployments.schemas import HealthCheck
from jarvis_deploy.engine.docker import DockerEngine, LogEntry, parse_docker_timestamp
from jarvis_deploy.engine.errors import EngineError, HealthCheckFailed

log = structlog.get_logger(__name__)

CRASH_LOG_LINES = 10
# docker-proxy, which publishes ports on the host's loopback, accepts a connection even when
# nothing listens in the container, and closes it at once. A TCP probe therefore waits this long
# for such a close before it counts the connection as open.
PROXY_CLOSE_WAIT = 0.25
# Docker reports these values in State.Health.Status. Only `healthy` lets a container pass.
DOCKER_HEALTHY = "healthy"
DOCKER_UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe round; `elapsed` counts seconds since the wait began."""

    number: int
    passed: bool
    address: str | None
    error: str | None
    elapsed: float
    docker_health: str | None


@dataclass(frozen=True)
class HealthReport:
    """Outcome of a passed wait; `duration` is in seconds and `address` is the last one probed."""

    container_id: str
    address: str
    probes: int
    duration: float
    docker_health: str | None


ProbeCallback = Callable[[ProbeResult], Awaitable[None] | None]


async def wait_until_healthy(
    engine: DockerEngine,
    container_id: str,
    port: int,
    check: HealthCheck | None,
    *,
    on_probe: ProbeCallback | None = None,
) -> HealthReport:
    """Probe the container's `port` until `check.successes` probes in a row pass, and return a report.

    Without a check, a TCP connect with the HealthCheck defaults gates the container. Each round
    inspects the container first. It fails at once when the container exited or was restarted by
    its restart policy, and when its own Docker HEALTHCHECK reports `unhealthy`. Failed probes
    within `start_period` seconds of the call do not count towards `retries`.
    Raises HealthCheckFailed with a reason for the person who reads the deployment.
    """
    check = check or HealthCheck(type="tcp")
    started = time.monotonic()
    probes = passes = failures = 0
    last_error: str | None = None
    address: str | None = None
    log.info("health.wait_started", container_id=container_id, port=port, type=check.type)

    while True:
        round_started = time.monotonic()
        info = await engine.inspect(container_id)
        await _raise_if_crashed(engine, info, probes, time.monotonic() - started)

        docker_health = _docker_health(info)
        if docker_health == DOCKER_UNHEALTHY:
            _raise_docker_unhealthy(info, probes, time.monotonic() - started)

        address = probe_address(info, port) or address
        probes += 1
        error = await _probe(info, address, port, check)
        passed = error is None and docker_health in (None, DOCKER_HEALTHY)
        elapsed = time.monotonic() - started

        if on_probe is not None:
            outcome = on_probe(ProbeResult(probes, passed, address, error, elapsed, docker_health))
            if inspection.isawaitable(outcome):
                await outcome

        if passed:
            passes += 1
            failures = 0
            if passes >= check.successes:
                seconds = round(elapsed, 3)
                log.info("health.passed", container_id=container_id, address=address, probes=probes, seconds=seconds)
                return HealthReport(container_id, address or "", probes, elapsed, docker_health)
        elif error is None:
            # The probe passed, but the image's own HEALTHCHECK is still `starting`. Docker's
            # retries bound that state, so it does not count as a failure here.
            passes = 0
        else:
            passes = 0
            last_error = error
            if elapsed >= check.start_period:
                failures += 1
            if failures >= check.retries:
                reason = (
                    f"health check failed: {failures} probes in a row failed ({probes} probes in {elapsed:.1f}s). "
                    f"Last error: {last_error.rstrip('.')}. Check that the application listens on port {port}"
                )
                if check.type == "http":
                    reason += (
                        f" and answers GET {check.path} with a status from {check.status_min} to {check.status_max}"
                    )
                log.warning(
                    "health.failed", container_id=container_id, address=address, probes=probes, error=last_error
                )
                raise HealthCheckFailed(reason, probes=probes, elapsed=elapsed)

        await asyncio.sleep(max(0.0, check.interval - (time.monotonic() - round_started)))


def probe_address(info: dict[str, Any], port: int) -> str | None:
    """Return `host:port` to probe: a published host port of `port`, else the container's IP.

    A binding to every interface is probed on loopback. The container's IP comes from its
    primary network (HostConfig.NetworkMode), else from the first network that has one.
    """
    settings = info.get("NetworkSettings") or {}
    bindings = (settings.get("Ports") or {}).get(f"{port}/tcp") or []
    published = [binding for binding in bindings if binding.get("HostPort")]
    # Docker lists an IPv4 and an IPv6 binding for the same port; IPv4 loopback is tried first.
    published.sort(key=lambda binding: ":" in (binding.get("HostIp") or ""))
    for binding in published:
        host = _loopback_for(binding.get("HostIp") or "")
        return _join_host_port(host, int(binding["HostPort"]))

    network_mode = (info.get("HostConfig") or {}).get("NetworkMode") or ""
    if network_mode == "host":
        return _join_host_port("127.0.0.1", port)
    networks: dict[str, Any] = settings.get("Networks") or {}
    ordered = sorted(networks.items(), key=lambda item: item[0] != network_mode)
    for _, network in ordered:
        if network.get("IPAddress"):
            return _join_host_port(network["IPAddress"], port)
        if network.get("GlobalIPv6Address"):
            return _join_host_port(network["GlobalIPv6Address"], port)
    return None


def _loopback_for(host_ip: str) -> str:
    if host_ip in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host_ip == "::":
        return "::1"
    return host_ip


def _join_host_port(host: str, port: int) -> str:
    try:
        is_ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_ipv6 = False
    return f"[{host}]:{port}" if is_ipv6 else f"{host}:{port}"


async def _probe(info: dict[str, Any], address: str | None, port: int, check: HealthCheck) -> str | None:
    """Probe once; returns None when the probe passed, else the error."""
    if address is None:
        status = (info.get("State") or {}).get("Status")
        return f"container (status {status}) has no published port for {port}/tcp and no IP address on a network"
    if check.type == "http":
        return await _probe_http(address, check)
    return await _probe_tcp(address, check.timeout)


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def _probe_http(address: str, check: HealthCheck) -> str | None:
    """Send one GET and return None when the status is in range, else the error."""
    headers = {"Host": check.host} if check.host else {}
    url = f"http://{address}{check.path}"
    # trust_env=False keeps HTTP_PROXY and similar variables from routing a probe elsewhere, and a
    # new connection per probe keeps a kept-alive connection from hiding a restart.
    async with httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        timeout=check.timeout,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        try:
            async with client.stream("GET", url, headers=headers) as response:
                status = response.status_code
        except httpx.TimeoutException:
            return f"GET {url} timed out after {check.timeout:g}s"
        except httpx.HTTPError as error:
            return f"GET {url} failed: {type(error).__name__}: {error or 'no details'}"
    if not check.status_min <= status <= check.status_max:
        return f"GET {url} returned status {status}, expected {check.status_min} to {check.status_max}"
    return None


async def _probe_tcp(address: str, timeout: float) -> str | None:
    """Connect once and return None when the connection stays open, else the error."""
    host, port = _split_host_port(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"TCP connect to {address} timed out after {timeout:g}s"
    except OSError as error:
        return f"TCP connect to {address} failed: {error.strerror or error}"

    try:
        try:
            data = await asyncio.wait_for(reader.read(1), min(PROXY_CLOSE_WAIT, timeout))
        except TimeoutError:
            return None
        except OSError as error:
            return f"TCP connection to {address} failed right after connect: {error.strerror or error}"
        if data:
            return None
        return (
            f"TCP connection to {address} was closed right after connect, "
            "as docker-proxy does while nothing listens on the container port"
        )
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _raise_if_crashed(engine: DockerEngine, info: dict[str, Any], probes: int, elapsed: float) -> None:
    state = info.get("State") or {}
    status = state.get("Status", "")
    restarts = int(info.get("RestartCount") or 0)
    if status not in ("exited", "dead", "removing") and not state.get("Restarting") and restarts == 0:
        return

    container_id = info["Id"]
    name = info.get("Name", "").lstrip("/") or container_id[:12]
    exit_code: int | None = state.get("ExitCode")
    if status not in ("exited", "dead") and not state.get("Restarting"):
        # The restart policy already started the container again and reset State.ExitCode.
        exit_code = None
        try:
            created, _ = parse_docker_timestamp(info["Created"])
            codes = await engine.exit_codes(container_id, since=created)
        except EngineError as error:
            log.warning("health.exit_code_unknown", container_id=container_id, error=str(error))
            codes = []
        if codes:
            exit_code = codes[-1]

    logs: list[LogEntry] = []
    try:
        logs = await engine.logs(container_id, CRASH_LOG_LINES)
    except EngineError as error:
        log.warning("health.crash_logs_unavailable", container_id=container_id, error=str(error))

    outcome = "exited" if status in ("exited", "dead", "removing") else f"crashed and was restarted {restarts} time(s)"
    code_text = f"with exit code {exit_code}" if exit_code is not None else "with an unknown exit code"
    oom = " (killed for running out of memory)" if state.get("OOMKilled") else ""
    reason = (
        f"container {name} {outcome} {code_text}{oom} after {elapsed:.1f}s and {probes} probes, "
        "before it became healthy"
    )
    if logs:
        reason += ". Last log lines:\n" + "\n".join(f"[{entry.stream}] {entry.text}" for entry in logs)
    else:
        reason += ". It wrote no log lines"
    log.warning(
        "health.container_exited", container_id=container_id, container=name, exit_code=exit_code, probes=probes
    )
    raise HealthCheckFailed(reason, probes=probes, elapsed=elapsed, exit_code=exit_code, logs=logs)


def _docker_health(info: dict[str, Any]) -> str | None:
    health = (info.get("State") or {}).get("Health")
    return health.get("Status") if health else None


def _raise_docker_unhealthy(info: dict[str, Any], probes: int, elapsed: float) -> None:
    name = info.get("Name", "").lstrip("/") or info["Id"][:12]
    results = info["State"]["Health"].get("Log") or []
    detail = ""
    if results:
        last = results[-1]
        output = (last.get("Output") or "").strip()
        detail = f". Its last check exited with code {last.get('ExitCode')}"
        if output:
            detail += f" and output: {output[-500:]}"
    reason = (
        f"container {name} is unhealthy according to the HEALTHCHECK of its image, after {elapsed:.1f}s "
        f"and {probes} probes{detail}"
    )
    log.warning("health.docker_unhealthy", container_id=info["Id"], container=name, probes=probes)
    raise HealthCheckFailed(reason, probes=probes, elapsed=elapsed)


# Consecutive failed probes that end the watch window; one lost probe is not a reason to roll back.
WATCH_FAILURES = 3


async def watch(
    engine: DockerEngine, container_ids: list[str], port: int, check: HealthCheck | None, seconds: float
) -> str | None:
    """Keep probing live containers for `seconds`; return why one turned unhealthy, or None if all stayed healthy.

    A container that exits or is restarted fails at once; a probe failure counts once
    WATCH_FAILURES probes in a row have failed.
    """
    check = check or HealthCheck(type="tcp")
    deadline = time.monotonic() + seconds
    failures = dict.fromkeys(container_ids, 0)
    probes = 0

    while time.monotonic() < deadline:
        for container_id in container_ids:
            try:
                info = await engine.inspect(container_id)
                await _raise_if_crashed(engine, info, probes, 0.0)
            except HealthCheckFailed as failed:
                return failed.reason
            except EngineError as error:
                return f"container {container_id[:12]} could not be inspected: {error}"

            if _docker_health(info) == DOCKER_UNHEALTHY:
                return f"container {info.get('Name', '').lstrip('/')} reports Docker health status unhealthy"

            error_text = await _probe(info, probe_address(info, port), port, check)
            probes += 1

            failures[container_id] = failures[container_id] + 1 if error_text else 0
            if failures[container_id] >= WATCH_FAILURES:
                name = info.get("Name", "").lstrip("/")
                return f"container {name} failed {WATCH_FAILURES} health probes in a row after the switch: {error_text}"
        await asyncio.sleep(min(check.interval, max(deadline - time.monotonic(), 0)))
    return None
