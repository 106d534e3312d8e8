"""Host port check for recreate: fail before stopping anything when a fixed host port is taken."""

import errno
import socket

from jarvis_deploy.engine.docker import ContainerInfo
from jarvis_deploy.engine.translate import container_config
from jarvis_deploy.strategies.base import DeploymentFailed, DeploymentRun


def _published_ports(body: dict) -> list[tuple[str, int]]:
    ports = []
    for bindings in (body["HostConfig"].get("PortBindings") or {}).values():
        for binding in bindings:
            if binding.get("HostPort"):
                ports.append((binding.get("HostIp") or "", int(binding["HostPort"])))
    return ports


async def _ports_of(run: DeploymentRun, container: ContainerInfo) -> set[int]:
    info = await run.engine.inspect(container.id)
    bindings = (info.get("HostConfig") or {}).get("PortBindings") or {}
    return {int(item["HostPort"]) for values in bindings.values() for item in values or [] if item.get("HostPort")}


def _bindable(host_ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host_ip or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


async def check_host_ports_free(run: DeploymentRun, old: list[ContainerInfo]) -> None:
    """Raise DeploymentFailed when a host port of the new version is held by anything but the old version.

    NOTE: the bind test assumes the worker runs on the Docker host itself (not in a container).
    """
    body = container_config(run.plan.document, run.plan.service, {}).body
    requested = _published_ports(body)
    if not requested:
        return

    held_by_old: set[int] = set()
    for container in old:
        if container.state == "running":
            held_by_old |= await _ports_of(run, container)

    for host_ip, port in requested:
        if port in held_by_old:
            continue
        if not _bindable(host_ip, port):
            raise DeploymentFailed(
                f"host port {port} is already in use by another process or container; "
                "free it or choose another host_port. Nothing was stopped"
            )
