"""Liveness and readiness probes; neither needs a token."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

router = APIRouter(tags=["health"])

CHECK_TIMEOUT = 3.0


class Readiness(BaseModel):
    status: str = Field(..., examples=["ready"])
    checks: dict[str, str] = Field(..., examples=[{"database": "ok", "redis": "ok", "docker": "ok"}])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Return 200 while the process is up."""
    return {"status": "ok"}


async def _check_database(request: Request) -> None:
    async with request.app.state.db_engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def _check_redis(request: Request) -> None:
    await request.app.state.redis.ping()


async def _check_docker(request: Request) -> None:
    await request.app.state.engine.ping()


async def _run_check(check, request: Request) -> str:
    try:
        await asyncio.wait_for(check(request), CHECK_TIMEOUT)
    except TimeoutError:
        return f"down: no answer within {CHECK_TIMEOUT:g} s"
    except Exception as error:  # noqa: BLE001  (any failure means the dependency is not usable)
        return f"down: {type(error).__name__}"
    return "ok"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """Report whether the database, Redis and the Docker Engine respond; a 503 names each one that is down."""
    names = ("database", "redis", "docker")
    results = await asyncio.gather(
        _run_check(_check_database, request), _run_check(_check_redis, request), _run_check(_check_docker, request)
    )
    checks = dict(zip(names, results, strict=True))
    ready = all(result == "ok" for result in results)
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    headers = None if ready else {"Retry-After": "5"}
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503, headers=headers)
