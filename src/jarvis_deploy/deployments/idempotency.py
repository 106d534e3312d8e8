"""`Idempotency-Key` on deploy: the same key with the same body returns the original deployment."""

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.config import Settings
from jarvis_deploy.db.models import Deployment, IdempotencyKey
from jarvis_deploy.deployments.schemas import DeployRequest
from jarvis_deploy.errors import Conflict, InvalidRequest

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
FIELD = ("header", HEADER)


def request_digest(body: DeployRequest, settings: Settings) -> str:
    """Keyed digest of the request body, so secret values in it cannot be guessed from the stored digest."""
    content = body.model_dump(mode="json")
    # model_dump masks SecretStr values; a changed secret must change the digest too.
    content["secrets"] = {name: value.get_secret_value() for name, value in (body.secrets or {}).items()}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))

    base = settings.secret_key.get_secret_value() if settings.secret_key else settings.instance_id
    key = hashlib.sha256(b"jarvis-deploy idempotency digest\0" + base.encode()).digest()
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable characters, such as a UUID", field=FIELD
        )


async def find_replay(session: AsyncSession, token_name: str, key: str, digest: str) -> Deployment | None:
    """Return the deployment an earlier request with this key created, or None when the key is new or expired."""
    row = await session.get(IdempotencyKey, (token_name, key))
    if row is None:
        return None
    if row.expires_at <= datetime.now(UTC):
        await session.execute(
            delete(IdempotencyKey).where(IdempotencyKey.token_name == token_name, IdempotencyKey.key == key)
        )
        return None
    if row.request_digest != digest:
        raise InvalidRequest(
            f"{HEADER} {key!r} was used with a different request body; send a new key for a new request",
            field=FIELD,
        )
    return await session.get(Deployment, row.deployment_id)


async def remember(
    session: AsyncSession, token_name: str, key: str, digest: str, deployment: Deployment, ttl_seconds: float
) -> None:
    """Store the key with the deployment it created, in the request's transaction."""
    statement = (
        insert(IdempotencyKey)
        .values(
            token_name=token_name,
            key=key,
            request_digest=digest,
            deployment_id=deployment.id,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_seconds),
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    )
    if (await session.execute(statement)).scalar_one_or_none() is None:
        # Another request with this key committed first; this one rolls back and creates nothing.
        raise Conflict(f"a request with {HEADER} {key!r} is being processed; retry it to get its deployment")
