"""Exception handlers that turn every error into an RFC 9457 `application/problem+json` response."""

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jarvis_deploy.db.errors import database_unavailable
from jarvis_deploy.errors import (
    DependencyUnavailable,
    InvalidRequest,
    JarvisError,
    Unauthorized,
)

logger = structlog.get_logger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://jarvis-deploy.dev/problems/"


class FieldError(BaseModel):
    field: str = Field(..., description="Dotted path of the offending field, e.g. `body.environment.DEBUG`.")
    message: str
    type: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


# The Problem schema is declared under application/problem+json, the type the service sends. FastAPI
# also lists it under application/json because "model" is how a schema gets into the components.
PROBLEM = {
    "model": Problem,
    "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def problem_doc(description: str) -> dict[str, Any]:
    return {**PROBLEM, "description": description}


# Errors any authenticated route can return.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem_doc("Missing, unknown or revoked bearer token."),
    403: problem_doc("The token lacks the scope or may not touch the project."),
    422: problem_doc("A parameter or the body breaks a validation rule; `errors` names each field."),
    500: problem_doc("An unexpected error; it was logged without request data."),
    503: problem_doc("The database, Redis or the Docker Engine is unavailable; see Retry-After."),
}
# Further errors of routes that read a JSON body.
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: problem_doc("The body is not valid JSON."),
    413: problem_doc("The body is larger than JARVIS_MAX_BODY_BYTES."),
}


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type_slug: str,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + type_slug,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


def _dotted(location: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in location)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Field errors without the rejected input, which may hold a secret."""
    errors = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            errors.append(_json_error(error))
            continue
        message = error.get("msg", "invalid value")
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        errors.append({"field": _dotted(error.get("loc", ())), "message": message, "type": error.get("type", "value_error")})
    return errors


def _json_error(error: dict[str, Any]) -> dict[str, str]:
    """Describe a body that is not JSON; FastAPI puts the character position where the field name goes."""
    location = error.get("loc", ())
    position = location[1] if len(location) > 1 else None
    reason = (error.get("ctx") or {}).get("error", "invalid JSON")
    where = f" at character {position}" if position is not None else ""
    message = f"the body is not valid JSON ({reason}{where}); send one JSON object"
    return {"field": "body", "message": message, "type": "json_invalid"}


async def _handle_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _validation_errors(exc)
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more field errors)"
    return problem_response(422, "Request validation failed", detail, type_slug="validation", errors=errors)


async def _handle_jarvis_error(request: Request, exc: JarvisError) -> JSONResponse:
    headers = None
    errors = None
    if isinstance(exc, DependencyUnavailable):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="jarvis-deploy"'}
    if isinstance(exc, InvalidRequest):
        errors = [{"field": _dotted(exc.field), "message": exc.detail, "type": exc.type_slug}]
    return problem_response(
        exc.status_code, exc.title, exc.detail, type_slug=exc.type_slug, errors=errors, headers=headers
    )


async def _handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    titles = {404: "Not found", 405: "Method not allowed", 400: "Bad request", 413: "Request too large"}
    title = titles.get(exc.status_code, "HTTP error")
    detail = exc.detail if isinstance(exc.detail, str) else title
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route matches {request.method} {request.url.path}"
    return problem_response(
        exc.status_code, title, detail, type_slug=f"http-{exc.status_code}", headers=getattr(exc, "headers", None)
    )


async def _handle_database(request: Request, exc: Exception) -> JSONResponse:
    if not database_unavailable(exc):
        return await _handle_unexpected(request, exc)
    logger.warning("database.unavailable", error_type=type(exc).__name__, path=request.url.path)
    return problem_response(
        503,
        "Dependency unavailable",
        "the database is unavailable; retry later",
        type_slug="unavailable",
        headers={"Retry-After": "5"},
    )


async def _handle_connection(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("dependency.unreachable", error_type=type(exc).__name__, path=request.url.path)
    return problem_response(
        503,
        "Dependency unavailable",
        "a dependency (database, Redis or the Docker Engine) could not be reached; retry later",
        type_slug="unavailable",
        headers={"Retry-After": "5"},
    )


async def _handle_redis(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis.unavailable", error_type=type(exc).__name__, path=request.url.path)
    return problem_response(
        503,
        "Dependency unavailable",
        "the job queue (Redis) is unavailable; retry later",
        type_slug="unavailable",
        headers={"Retry-After": "5"},
    )


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request.failed", path=request.url.path, method=request.method)
    return problem_response(
        500, "Internal error", "the server failed to handle this request; the error was logged", type_slug="internal"
    )


def register_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(JarvisError, _handle_jarvis_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(DBAPIError, _handle_database)
    app.add_exception_handler(OSError, _handle_connection)
    app.add_exception_handler(RedisError, _handle_redis)
    app.add_exception_handler(Exception, _handle_unexpected)
