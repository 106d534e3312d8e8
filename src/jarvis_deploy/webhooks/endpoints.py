"""HTTP routes under /api/jarvis/webhooks; all need the `admin` scope."""

import uuid

from fastapi import APIRouter, Query, Request, Response, status

from jarvis_deploy.api.deps import SessionDep, SettingsDep
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth.audit import note_target
from jarvis_deploy.auth.deps import AdminPrincipal
from jarvis_deploy.db.models import Project
from jarvis_deploy.webhooks import service
from jarvis_deploy.webhooks.schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryRead,
    WebhookRead,
)

router = APIRouter(prefix="/api/jarvis/webhooks", tags=["webhooks"], responses=COMMON_ERRORS)

NOT_FOUND = problem_doc("No webhook with this id.")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    responses={
        **BODY_ERRORS,
        503: problem_doc("A dependency is unavailable, or JARVIS_SECRET_KEY is unset so the secret cannot be stored."),
    },
)
async def create_webhook(
    body: WebhookCreate, request: Request, session: SessionDep, settings: SettingsDep, principal: AdminPrincipal
) -> WebhookCreated:
    """Subscribe a URL to the final states of a project's deployments, or of every project's.

    The signing secret appears only in this response.
    """
    subscription, secret = await service.create(session, body, settings.secret_key, principal)
    if subscription.project_id is not None:
        project = await session.get(Project, subscription.project_id)
        note_target(request, project=project.name if project is not None else None)
    return WebhookCreated(**WebhookRead.model_validate(subscription).model_dump(), secret=secret)


@router.get("", response_model=list[WebhookRead])
async def list_webhooks(session: SessionDep, principal: AdminPrincipal) -> list[WebhookRead]:
    """List the webhooks the token may touch (never their secrets)."""
    return [WebhookRead.model_validate(row) for row in await service.list_visible(session, principal)]


@router.delete(
    "/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response, responses={404: NOT_FOUND}
)
async def delete_webhook(webhook_id: uuid.UUID, session: SessionDep, principal: AdminPrincipal) -> Response:
    """Delete a webhook and its delivery records; deliveries still queued for it are dropped."""
    await service.delete_subscription(session, webhook_id, principal)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=list[WebhookDeliveryRead], responses={404: NOT_FOUND})
async def list_webhook_deliveries(
    webhook_id: uuid.UUID,
    session: SessionDep,
    principal: AdminPrincipal,
    limit: int = Query(100, ge=1, le=1000, description="Attempts to return."),
    before_id: int | None = Query(None, ge=1, le=2**63 - 1, description="Only attempts with a smaller id (for paging)."),
) -> list[WebhookDeliveryRead]:
    """Read the delivery attempts of a webhook, newest first: time, HTTP status or error, and duration."""
    await service.get_accessible(session, webhook_id, principal)
    rows = await service.list_deliveries(session, webhook_id, limit=limit, before_id=before_id)
    return [WebhookDeliveryRead.model_validate(row) for row in rows]
