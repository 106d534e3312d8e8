"""Webhook subscriptions: create with an encrypted signing secret, list, delete, and read delivery attempts.

Services flush; callers commit.
"""

import secrets
import uuid

import structlog
from pydantic import SecretStr
from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.auth.service import Principal
from jarvis_deploy.db.models import Project, WebhookDelivery, WebhookSubscription
from jarvis_deploy.errors import Forbidden, InvalidRequest, NotFound
from jarvis_deploy.secrets.cipher import (
    GENERATE_KEY_HINT,
    SecretCipher,
    SecretKeyInvalid,
)
from jarvis_deploy.secrets.store import SecretsNotConfigured
from jarvis_deploy.webhooks.schemas import WebhookCreate

logger = structlog.get_logger(__name__)

# 32 random bytes, as URL-safe base64 text.
GENERATED_SECRET_BYTES = 32


def webhook_cipher(key: SecretStr | None) -> SecretCipher:
    """Build the cipher for signing secrets, or raise SecretsNotConfigured (503) without a valid key."""
    if key is None:
        raise SecretsNotConfigured(
            "webhook signing secrets are stored encrypted, but JARVIS_SECRET_KEY is not set on the service. "
            f"The operator must set it to a Fernet key ({GENERATE_KEY_HINT}) and restart the API and the worker"
        )
    try:
        return SecretCipher(key)
    except SecretKeyInvalid as error:
        raise SecretsNotConfigured(f"{error}; the operator must fix it and restart the API and the worker") from None


def _check_access(principal: Principal, project: Project | None) -> None:
    """Check the token against a webhook's project; a webhook for every project (None) needs an unlimited token."""
    if project is not None:
        principal.check_project(project.name)
    elif principal.projects is not None:
        raise Forbidden(
            f"token {principal.name!r} is limited to projects, so it may not touch a webhook for every project"
        )


async def create(
    session: AsyncSession, body: WebhookCreate, key: SecretStr | None, principal: Principal
) -> tuple[WebhookSubscription, str]:
    """Store a subscription and return it with its signing secret, which is stored only encrypted."""
    cipher = webhook_cipher(key)
    project = None
    if body.project_id is not None:
        project = await session.get(Project, body.project_id)
        if project is None:
            raise InvalidRequest(
                f"no project with id {body.project_id}; create it first or omit project_id", field=("body", "project_id")
            )
    _check_access(principal, project)

    secret = body.secret.get_secret_value() if body.secret is not None else secrets.token_urlsafe(GENERATED_SECRET_BYTES)
    subscription = WebhookSubscription(
        id=uuid.uuid4(), url=str(body.url), project_id=body.project_id, secret_ciphertext=cipher.encrypt(secret)
    )
    session.add(subscription)
    await session.flush()
    await session.refresh(subscription)
    logger.info(
        "webhook.created",
        webhook_id=str(subscription.id),
        project=project.name if project is not None else None,
        secret_generated=body.secret is None,
    )
    return subscription, secret


async def list_visible(session: AsyncSession, principal: Principal) -> list[WebhookSubscription]:
    """List the subscriptions the token may touch, oldest first."""
    statement = select(WebhookSubscription).order_by(WebhookSubscription.created_at, WebhookSubscription.id)
    if principal.projects is not None:
        allowed = select(Project.id).where(Project.name.in_(principal.projects))
        statement = statement.where(WebhookSubscription.project_id.in_(allowed))
    return list((await session.execute(statement)).scalars())


async def get_accessible(session: AsyncSession, webhook_id: uuid.UUID, principal: Principal) -> WebhookSubscription:
    subscription = await session.get(WebhookSubscription, webhook_id)
    if subscription is None:
        raise NotFound(f"no webhook with id {webhook_id}")
    project = await session.get(Project, subscription.project_id) if subscription.project_id is not None else None
    _check_access(principal, project)
    return subscription


async def delete_subscription(session: AsyncSession, webhook_id: uuid.UUID, principal: Principal) -> None:
    """Delete a subscription with its delivery records; its queued deliveries find it gone and are dropped."""
    await get_accessible(session, webhook_id, principal)
    await session.execute(delete(WebhookSubscription).where(WebhookSubscription.id == webhook_id))
    logger.info("webhook.deleted", webhook_id=str(webhook_id))


async def list_deliveries(
    session: AsyncSession, webhook_id: uuid.UUID, *, limit: int, before_id: int | None
) -> list[WebhookDelivery]:
    """Return delivery attempts newest first, `limit` of them with ids below `before_id`."""
    statement = (
        select(WebhookDelivery)
        .where(WebhookDelivery.subscription_id == webhook_id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        statement = statement.where(WebhookDelivery.id < before_id)
    return list((await session.execute(statement)).scalars())


async def matching_subscriptions(session: AsyncSession, project_id: uuid.UUID) -> list[WebhookSubscription]:
    """Return the subscriptions for this project and those for every project."""
    statement = select(WebhookSubscription).where(
        or_(WebhookSubscription.project_id == project_id, WebhookSubscription.project_id.is_(None))
    )
    return list((await session.execute(statement)).scalars())
