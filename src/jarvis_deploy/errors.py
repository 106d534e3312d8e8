"""The service's error hierarchy; each error carries the HTTP status it maps to."""

from typing import Any


class JarvisError(Exception):
    """Base of every error the API turns into an RFC 9457 problem document."""

    status_code = 500
    title = "Internal error"
    type_slug = "internal"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class NotFound(JarvisError):
    status_code = 404
    title = "Not found"
    type_slug = "not-found"


class Conflict(JarvisError):
    status_code = 409
    title = "Conflict"
    type_slug = "conflict"


class Gone(JarvisError):
    """The resource existed, but retention removed it."""

    status_code = 410
    title = "Gone"
    type_slug = "gone"


class InvalidRequest(JarvisError):
    """A request that passed the schema but breaks a rule that needs the database to check."""

    status_code = 422
    title = "Invalid request"
    type_slug = "invalid-request"

    def __init__(self, detail: str, *, field: tuple[str | int, ...], **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.field = field


class DependencyUnavailable(JarvisError):
    status_code = 503
    title = "Dependency unavailable"
    type_slug = "unavailable"

    def __init__(self, detail: str, *, dependency: str, retry_after: int = 5) -> None:
        super().__init__(detail, dependency=dependency)
        self.dependency = dependency
        self.retry_after = retry_after


class Unauthorized(JarvisError):
    status_code = 401
    title = "Unauthorized"
    type_slug = "unauthorized"


class Forbidden(JarvisError):
    status_code = 403
    title = "Forbidden"
    type_slug = "forbidden"
