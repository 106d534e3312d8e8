"""Webhook delivery: one arq job per subscription when a deployment ends, signed, retried with back-off.

A request carries `X-Jarvis-Timestamp` (Unix seconds) and
`X-Jarvis-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under the signing secret>`.
Every attempt is stored in `webhook_deliveries`. Nothing here changes a deployment, and
`notify_final_state` logs its own errors instead of raising them.
"""

import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import structlog
from arq import Retry
from arq.connections import ArqRedis
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy import __version__
from jarvis_deploy.config import Settings
from jarvis_deploy.db.models import (
    Deployment,
    Project,
    WebhookDelivery,
    WebhookSubscription,
)
from jarvis_deploy.deployments.schemas import DeploymentRead, DeploymentStatus
from jarvis_deploy.projects.schemas import ProjectRead
from jarvis_deploy.secrets.cipher import SecretCipher, SecretError
from jarvis_deploy.webhooks.service import matching_subscriptions

logger = structlog.get_logger(__name__)

DELIVER_WEBHOOK = "deliver_webhook"
TIMESTAMP_HEADER = "X-Jarvis-Timestamp"
SIGNATURE_HEADER = "X-Jarvis-Signature"
EVENT_HEADER = "X-Jarvis-Event"
# `superseded` is left out: the deployment that superseded it sends its own `deployment.succeeded`.
NOTIFIED_STATUSES = frozenset(
    {
        DeploymentStatus.SUCCEEDED,
        DeploymentStatus.FAILED,
        DeploymentStatus.ROLLED_BACK,
        DeploymentStatus.CANCELLED,
        DeploymentStatus.STOPPED,
    }
)
# Seconds before retry n (n = 1, 2, ...); later retries wait as long as the last entry.
RETRY_DELAYS_SECONDS = (1, 5, 30, 60, 300)
# Maximum length of the error text stored for one attempt.
MAX_ERROR_LENGTH = 500
# Namespace of event ids, so that every attempt and every subscription gets the same id for one event.
EVENT_ID_NAMESPACE = uuid.UUID("5b0f7a0e-8f7c-4d55-9a8e-3c1f2b6d4e90")


class NotifyContext(Protocol):
    """Source of settings and database sessions for notify_final_state: a WorkerContext, or the API's `app.state`."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """Return the `X-Jarvis-Signature` value of a request body sent at `timestamp`."""
    message = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def retry_delay(attempt: int) -> int:
    """Return the seconds to wait after failed attempt number `attempt` (counted from 1)."""
    return RETRY_DELAYS_SECONDS[min(attempt, len(RETRY_DELAYS_SECONDS)) - 1]


def delivery_job_id(subscription_id: uuid.UUID, deployment_id: uuid.UUID, status: str) -> str:
    # One job per subscription and final state, so calling notify_final_state twice sends one POST.
    return f"{DELIVER_WEBHOOK}:{subscription_id}:{deployment_id}:{status}"


async def notify_final_state(context: NotifyContext, deployment_id: uuid.UUID) -> int:
    """Enqueue one delivery job per subscription that matches the deployment's project; return how many.

    Call it after the final state is committed. It does nothing when the deployment is not in a
    notified state or no subscription matches. Errors are logged and swallowed, so a webhook
    problem never changes the outcome of a deployment.

    Callers: the runner (succeeded, failed, rolled_back, stopped), recovery (failed) and the API's
    cancel and stop of a queued deployment (cancelled).
    """
    try:
        return await _enqueue_deliveries(context, deployment_id)
    except Exception as error:  # noqa: BLE001  (webhooks must never affect the deployment)
        logger.warning(
            "webhook.enqueue_failed", deployment_id=str(deployment_id), error_type=type(error).__name__, error=str(error)
        )
        return 0


async def _enqueue_deliveries(context: NotifyContext, deployment_id: uuid.UUID) -> int:
    async with context.sessionmaker() as session:
        deployment = await session.get(Deployment, deployment_id)
        if deployment is None or deployment.status not in NOTIFIED_STATUSES:
            return 0
        project = await session.get(Project, deployment.project_id)
        assert project is not None
        subscriptions = await matching_subscriptions(session, project.id)
        if not subscriptions:
            return 0
        event = build_event(deployment, project)

    settings = context.settings
    redis = ArqRedis.from_url(settings.redis_url)
    enqueued = 0
    try:
        for subscription in subscriptions:
            job = await redis.enqueue_job(
                DELIVER_WEBHOOK,
                str(subscription.id),
                str(deployment_id),
                event,
                _job_id=delivery_job_id(subscription.id, deployment_id, deployment.status),
                _queue_name=settings.queue_name,
            )
            enqueued += job is not None
    finally:
        await redis.aclose()
    logger.info(
        "webhook.enqueued",
        deployment_id=str(deployment_id),
        event_type=event["type"],
        subscriptions=len(subscriptions),
        enqueued=enqueued,
    )
    return enqueued


def build_event(deployment: Deployment, project: Project) -> dict[str, Any]:
    """Return the event body without `sent_at`, which each attempt adds. It has no secret values.

    The read model's `error` passed through `redact` before it was stored.
    """
    event_type = f"deployment.{deployment.status}"
    return {
        "id": str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{deployment.id}:{deployment.status}")),
        "type": event_type,
        "deployment": DeploymentRead.model_validate(deployment).model_dump(mode="json"),
        "project": ProjectRead.model_validate(project).model_dump(mode="json"),
    }


async def deliver_webhook(ctx: dict[str, Any], subscription_id: str, deployment_id: str, event: dict[str, Any]) -> str:
    """arq job: POST one event to one subscription, and raise Retry after a failure until the last try.

    Returns `delivered`, `failed` (gave up) or `skipped` (the subscription was deleted).
    """
    context = ctx["context"]
    settings: Settings = context.settings
    attempt: int = ctx["job_try"]
    log = logger.bind(
        webhook_id=subscription_id, deployment_id=deployment_id, event_type=event["type"], attempt=attempt
    )

    async with context.sessionmaker() as session:
        subscription = await session.get(WebhookSubscription, uuid.UUID(subscription_id))
    if subscription is None:
        log.info("webhook.skipped", reason="the subscription was deleted")
        return "skipped"

    try:
        if settings.secret_key is None:
            raise SecretError("JARVIS_SECRET_KEY is not set on the worker, so the signing secret cannot be decrypted")
        secret = SecretCipher(settings.secret_key).decrypt(subscription.secret_ciphertext, f"webhook {subscription_id}")
    except SecretError as error:
        # A retry cannot help until the operator fixes the key, so this attempt is the last.
        await _record(context, subscription, deployment_id, event, attempt, None, str(error), 0)
        log.error("webhook.failed", reason=str(error), retrying=False)
        return "failed"

    status_code, error, duration_ms = await _post(subscription.url, event, secret, settings.webhook_timeout)
    await _record(context, subscription, deployment_id, event, attempt, status_code, error, duration_ms)
    if error is None:
        log.info("webhook.delivered", status_code=status_code, duration_ms=duration_ms)
        return "delivered"

    if attempt < settings.webhook_max_tries:
        delay = retry_delay(attempt)
        log.warning("webhook.attempt_failed", status_code=status_code, error=error, retry_in_seconds=delay)
        raise Retry(defer=delay)
    log.error("webhook.failed", status_code=status_code, error=error, retrying=False, max_tries=settings.webhook_max_tries)
    return "failed"


async def _post(url: str, event: dict[str, Any], secret: str, timeout: float) -> tuple[int | None, str | None, int]:
    """POST the signed event once; return the status code, an error for anything but 2xx, and the milliseconds taken."""
    body = json.dumps({**event, "sent_at": datetime.now(UTC).isoformat()}, separators=(",", ":")).encode("utf-8")
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"jarvis-deploy/{__version__}",
        EVENT_HEADER: event["type"],
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }

    started = time.monotonic()
    try:
        # Redirects are not followed: the signature is meant for the subscribed URL only.
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            response = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        duration_ms = round((time.monotonic() - started) * 1000)
        return None, f"{type(error).__name__}: {error}"[:MAX_ERROR_LENGTH], duration_ms

    duration_ms = round((time.monotonic() - started) * 1000)
    if 200 <= response.status_code < 300:
        return response.status_code, None, duration_ms
    return response.status_code, f"the receiver returned HTTP {response.status_code}", duration_ms


async def _record(
    context: NotifyContext,
    subscription: WebhookSubscription,
    deployment_id: str,
    event: dict[str, Any],
    attempt: int,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
) -> None:
    """Store one attempt; a failure to store it is logged, because the POST has happened either way."""
    row = WebhookDelivery(
        subscription_id=subscription.id,
        deployment_id=uuid.UUID(deployment_id),
        event_type=event["type"],
        attempt=attempt,
        status_code=status_code,
        error=error,
        duration_ms=duration_ms,
    )
    try:
        async with context.sessionmaker() as session:
            session.add(row)
            await session.commit()
    except (SQLAlchemyError, OSError) as record_error:
        # IntegrityError here means the subscription or the deployment was deleted meanwhile.
        logger.warning(
            "webhook.record_failed",
            webhook_id=str(subscription.id),
            deployment_id=deployment_id,
            attempt=attempt,
            error_type=type(record_error).__name__,
        )
