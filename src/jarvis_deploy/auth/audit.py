"""Audit trail: one record for every mutating API request, written after the response is known."""

import uuid
from collections.abc import Awaitable, Callable

import structlog
from fastapi import Request, Response
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.db.models import AuditRecord

logger = structlog.get_logger(__name__)

MUTATING_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
AUDITED_PREFIX = "/api/jarvis/"


def note_target(request: Request, *, project: str | None = None, deployment_id: uuid.UUID | None = None) -> None:
    """Tell the audit record which project and deployment the request touched."""
    if project is not None:
        request.state.audit_project = project
    if deployment_id is not None:
        request.state.audit_deployment = deployment_id


async def audit_middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    if request.method not in MUTATING_METHODS or not request.url.path.startswith(AUDITED_PREFIX):
        return response

    principal = getattr(request.state, "principal", None)
    record = AuditRecord(
        token_name=principal.name if principal else None,
        method=request.method,
        path=request.url.path[:2048],
        project=getattr(request.state, "audit_project", None),
        deployment_id=getattr(request.state, "audit_deployment", None),
        status_code=response.status_code,
    )
    try:
        async with request.app.state.sessionmaker() as session:
            session.add(record)
            await session.commit()
    except (SQLAlchemyError, OSError) as error:
        logger.warning(
            "audit.write_failed", method=request.method, path=request.url.path, status=response.status_code, error=str(error)
        )
    return response


async def list_records(session: AsyncSession, *, limit: int, before_id: int | None) -> list[AuditRecord]:
    """Return audit records newest first, `limit` of them with ids below `before_id`."""
    statement = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if before_id is not None:
        statement = statement.where(AuditRecord.id < before_id)
    return list((await session.execute(statement)).scalars())
