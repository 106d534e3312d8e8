"""Errors of the Docker Engine layer; messages carry the daemon's or registry's own text."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jarvis_deploy.engine.docker import LogEntry


class EngineError(Exception):
    """A Docker Engine API request failed; `status` is the HTTP status, or None without a response."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ImagePullError(EngineError):
    def __init__(self, image: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.image = image


class ContainerNotFound(EngineError):
    def __init__(self, container: str, message: str) -> None:
        super().__init__(message, status=404)
        self.container = container


class ContainerNameConflict(EngineError):
    """The container name is taken by a container of another deployment, or one without the deployment label."""

    def __init__(self, name: str, existing_id: str, message: str) -> None:
        super().__init__(message, status=409)
        self.name = name
        self.existing_id = existing_id


class TranslationError(ValueError):
    """The Compose document contains something that cannot become a container create body."""


class HealthCheckFailed(Exception):
    """A new container did not become healthy; `reason` describes what failed and what to check."""

    def __init__(
        self,
        reason: str,
        *,
        probes: int,
        elapsed: float,
        exit_code: int | None = None,
        logs: Sequence["LogEntry"] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.probes = probes
        self.elapsed = elapsed
        self.exit_code = exit_code
        self.logs = list(logs)
