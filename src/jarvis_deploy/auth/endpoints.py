"""HTTP routes for API tokens and the audit trail; all need the `admin` scope."""

import uuid

from fastapi import APIRouter, Query, Request, status

from jarvis_deploy.api.deps import SessionDep
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth import audit, service
from jarvis_deploy.auth.deps import AdminPrincipal
from jarvis_deploy.auth.schemas import (
    AuditRecordRead,
    TokenCreate,
    TokenCreated,
    TokenRead,
)

router = APIRouter(prefix="/api/jarvis", tags=["admin"], responses=COMMON_ERRORS)



@router.post(
    "/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses={**BODY_ERRORS, 409: problem_doc("A token with this name exists.")},
)
async def create_token(body: TokenCreate, session: SessionDep, principal: AdminPrincipal) -> TokenCreated:
    """Create an API token; the token itself appears only in this response."""
    row, token = await service.create(session, name=body.name, scopes=body.scopes, projects=body.projects)
    return TokenCreated(**TokenRead.model_validate(row).model_dump(), token=token)


@router.get("/tokens", response_model=list[TokenRead])
async def list_tokens(session: SessionDep, principal: AdminPrincipal) -> list[TokenRead]:
    """List API tokens (never the tokens themselves)."""
    return [TokenRead.model_validate(row) for row in await service.list_all(session)]


@router.delete("/tokens/{token_id}", response_model=TokenRead, responses={404: problem_doc("No token with this id.")})
async def revoke_token(token_id: uuid.UUID, session: SessionDep, principal: AdminPrincipal) -> TokenRead:
    """Revoke an API token; requests with it get 401 from now on."""
    return TokenRead.model_validate(await service.revoke(session, token_id))


@router.get("/audit", response_model=list[AuditRecordRead])
async def list_audit_records(
    request: Request,
    session: SessionDep,
    principal: AdminPrincipal,
    limit: int = Query(100, ge=1, le=1000, description="Records to return."),
    before_id: int | None = Query(None, ge=1, le=2**63 - 1, description="Only records with a smaller id (for paging)."),
) -> list[AuditRecordRead]:
    """Read the audit trail of mutating requests, newest first."""
    rows = await audit.list_records(session, limit=limit, before_id=before_id)
    return [AuditRecordRead.model_validate(row) for row in rows]
