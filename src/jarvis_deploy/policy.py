"""Safety policy for deployment requests: what a request may ask of the host.

The worker starts containers through the Docker Engine, which is root on the host, so a request
must not reach the host's files, the Docker socket or privileged ports unless an operator setting
allows it. `check_request` enforces the rules that depend on settings:

- a bind mount source must lie inside one of `JARVIS_ALLOWED_BIND_ROOTS` after `..` and repeated
  slashes are normalized (none by default, so every bind mount is rejected by default);
- a bind mount of the Docker socket, or of a directory that contains it, is rejected unless
  `JARVIS_ALLOW_DOCKER_SOCKET=true`, even inside an allowed root;
- a published host port below 1024 is rejected unless `JARVIS_ALLOW_PRIVILEGED_PORTS=true`;
- when `JARVIS_ALLOWED_REGISTRIES` is set, the image must come from one of those registries.

Privileged mode, host network, PID or IPC namespaces, added capabilities and devices need no
check here, because `DeployRequest` has no fields for them and forbids unknown fields. A request
with `privileged`, `network_mode`, `pid`, `ipc`, `cap_add` or `devices` therefore fails schema
validation (422) before this module runs.

NOTE: paths are compared as text, because the API may not run on the Docker host. A symbolic link
inside an allowed root that points outside it (for example one created by an earlier container
that mounted the root read-write) is followed by the Docker Engine and escapes this check.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from jarvis_deploy import references
from jarvis_deploy.deployments.schemas import DeployRequest, Volume
from jarvis_deploy.errors import InvalidRequest

if TYPE_CHECKING:
    from jarvis_deploy.config import Settings

DEFAULT_REGISTRY = "docker.io"
# The reference library of github.com/distribution/reference rewrites the legacy name index.docker.io to docker.io.
DEFAULT_REGISTRY_ALIASES = frozenset({"docker.io", "index.docker.io"})
DOCKER_SOCKET_PATHS = ("/var/run/docker.sock", "/run/docker.sock")
DOCKER_SOCKET_SUFFIX = "docker.sock"
FIRST_UNPRIVILEGED_PORT = 1024


def normalize_host_path(path: str) -> str:
    """Normalize an absolute host path: collapse `.`, `..` and repeated slashes, drop a trailing slash."""
    # posixpath.normpath keeps a leading "//" because POSIX leaves its meaning open, but Linux reads it as "/".
    return "/" + posixpath.normpath(path).lstrip("/")


def is_within(path: str, root: str) -> bool:
    """Return whether normalized `path` is `root` or lies below it, so `/srv/application` is not below `/srv/app`."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_request(request: DeployRequest, settings: Settings) -> None:
    """Raise InvalidRequest, naming the field, when the request breaks the safety policy."""
    for index, volume in enumerate(request.volumes):
        if volume.is_bind:
            _check_bind_mount(volume, ("body", "volumes", index, "source"), settings)
    _check_host_port(request, settings)
    _check_registry(request, settings)


def _check_bind_mount(volume: Volume, field: tuple[str | int, ...], settings: Settings) -> None:
    path = normalize_host_path(volume.source)
    shown = repr(volume.source) if path == volume.source else f"{volume.source!r} (normalized {path!r})"

    if not settings.allow_docker_socket and _exposes_docker_socket(path, settings):
        raise InvalidRequest(
            f"bind mount source {shown} is or contains the Docker socket, which gives the container root on the "
            "host. Remove the mount, or set JARVIS_ALLOW_DOCKER_SOCKET=true to allow it",
            field=field,
        )

    if not any(is_within(path, root) for root in settings.allowed_bind_roots):
        if settings.allowed_bind_roots:
            roots = ", ".join(repr(root) for root in settings.allowed_bind_roots)
            where = f"outside the allowed bind roots ({roots})"
        else:
            where = "not allowed because JARVIS_ALLOWED_BIND_ROOTS is empty"
        raise InvalidRequest(
            f"bind mount source {shown} is {where}. Use a named volume, or add a parent directory to "
            "JARVIS_ALLOWED_BIND_ROOTS",
            field=field,
        )


def _exposes_docker_socket(path: str, settings: Settings) -> bool:
    """Return whether `path` is a Docker socket or a directory above one of the known socket paths."""
    if path.endswith(DOCKER_SOCKET_SUFFIX):
        return True
    sockets = list(DOCKER_SOCKET_PATHS)
    if settings.docker_url.startswith("unix://"):
        sockets.append(normalize_host_path(settings.docker_url.removeprefix("unix://")))
    return any(is_within(socket, path) for socket in sockets)


def _check_host_port(request: DeployRequest, settings: Settings) -> None:
    # With a domain the container publishes no fixed host port (Caddy reaches it), so `host_port` is unused.
    if settings.allow_privileged_ports or request.domains:
        return
    if request.host_port is not None:
        host_port, field = request.host_port, ("body", "host_port")
    else:
        host_port, field = request.port, ("body", "port")
    if host_port < FIRST_UNPRIVILEGED_PORT:
        raise InvalidRequest(
            f"host port {host_port} is below {FIRST_UNPRIVILEGED_PORT} (a privileged port). Choose a `host_port` "
            "of 1024 or above, or set JARVIS_ALLOW_PRIVILEGED_PORTS=true to allow it",
            field=field,
        )


def _check_registry(request: DeployRequest, settings: Settings) -> None:
    if not settings.allowed_registries:
        return
    registry = registry_of(request.image_ref)
    allowed = {_canonical_registry(name) for name in settings.allowed_registries}
    if registry not in allowed:
        names = ", ".join(repr(name) for name in settings.allowed_registries)
        raise InvalidRequest(
            f"image {request.image_ref!r} comes from registry {registry!r}, which is not in the allowed registries "
            f"({names}). Push the image to one of them, or add the registry to JARVIS_ALLOWED_REGISTRIES",
            field=("body", "image_ref"),
        )


def registry_of(image_ref: str) -> str:
    """Return the lowercase registry host (with port) of an image reference, or `docker.io` when it names none."""
    registry = references.parse_image_reference(image_ref).registry
    return _canonical_registry(registry or DEFAULT_REGISTRY)


def _canonical_registry(name: str) -> str:
    lowered = name.lower()
    return DEFAULT_REGISTRY if lowered in DEFAULT_REGISTRY_ALIASES else lowered
