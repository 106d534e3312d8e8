"""Storage of secret ciphertexts per Compose spec, loading for the worker, and the start-up key check."""

import uuid
from collections.abc import Mapping

import structlog
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy.db.models import SpecSecret
from jarvis_deploy.errors import JarvisError
from jarvis_deploy.secrets.cipher import (
    GENERATE_KEY_HINT,
    SecretCipher,
    SecretError,
    SecretKeyInvalid,
    is_placeholder,
)

logger = structlog.get_logger(__name__)

# Secret values shorter than this are not redacted from failure messages, because replacing every
# "1" or "on" in a message would make it unreadable.
MIN_REDACTED_LENGTH = 4
REDACTED = "[secret]"


class SecretsNotConfigured(JarvisError):
    """A request carries secrets, but the service has no usable JARVIS_SECRET_KEY to encrypt them."""

    status_code = 503
    title = "Secrets not configured"
    type_slug = "secrets-not-configured"


class SecretKeyMismatch(SecretError):
    """Start-up check: stored secrets exist, and JARVIS_SECRET_KEY is missing or cannot decrypt them."""


def request_cipher(key: SecretStr | None) -> SecretCipher:
    """Build the cipher for a request that carries secrets, or raise SecretsNotConfigured without a valid key."""
    if key is None:
        raise SecretsNotConfigured(
            "this request carries secrets, but JARVIS_SECRET_KEY is not set on the service, so they cannot be "
            f"encrypted. The operator must set it to a Fernet key ({GENERATE_KEY_HINT}) and restart the API "
            "and the worker"
        )
    try:
        return SecretCipher(key)
    except SecretKeyInvalid as error:
        raise SecretsNotConfigured(f"{error}; the operator must fix it and restart the API and the worker") from None


async def store_spec_secrets(
    session: AsyncSession, spec_id: uuid.UUID, secrets: Mapping[str, SecretStr], cipher: SecretCipher
) -> None:
    """Store the ciphertext of each secret of a spec, unless the spec has it already.

    A spec is shared by every deployment with its checksum, and the checksum covers the placeholders,
    so an existing row contains the same value.
    """
    if not secrets:
        return
    rows = [
        {"spec_id": spec_id, "name": name, "ciphertext": cipher.encrypt(value.get_secret_value())}
        for name, value in secrets.items()
    ]
    await session.execute(insert(SpecSecret).values(rows).on_conflict_do_nothing(index_elements=["spec_id", "name"]))


async def load_spec_secrets(
    session: AsyncSession, spec_id: uuid.UUID, environment: Mapping[str, str], key: SecretStr | None
) -> dict[str, SecretStr]:
    """Decrypt the secrets of a spec and check each against its placeholder in the service's `environment`.

    Raises SecretError, naming the secret, when the key is missing or wrong, or a placeholder has
    no stored value or does not match it.
    """
    rows = list((await session.execute(select(SpecSecret).where(SpecSecret.spec_id == spec_id))).scalars())
    stored = {row.name for row in rows}
    missing = sorted(
        name
        for name, value in environment.items()
        if isinstance(value, str) and is_placeholder(value) and name not in stored
    )
    if missing:
        raise SecretError(f"secrets {', '.join(missing)} have a placeholder in the spec but no stored value")
    if not rows:
        return {}
    if key is None:
        raise SecretError("this deployment has secrets, but JARVIS_SECRET_KEY is not set on the worker; set it and retry")

    cipher = SecretCipher(key)
    secrets: dict[str, SecretStr] = {}
    for row in rows:
        value = cipher.decrypt(row.ciphertext, row.name)
        if environment.get(row.name) != cipher.placeholder(row.name, value):
            raise SecretError(
                f"secret {row.name!r} does not match its placeholder in the stored spec; it was encrypted with "
                "another JARVIS_SECRET_KEY or changed in the database. Deploy again with the secret's value"
            )
        secrets[row.name] = SecretStr(value)
    return secrets


def redact(text: str, secrets: Mapping[str, SecretStr]) -> str:
    """Replace each secret value in `text`, such as container log lines quoted in a failure reason."""
    for value in sorted((secret.get_secret_value() for secret in secrets.values()), key=len, reverse=True):
        if len(value) >= MIN_REDACTED_LENGTH:
            text = text.replace(value, REDACTED)
    return text


async def check_secret_key(sessionmaker: async_sessionmaker[AsyncSession], key: SecretStr | None) -> int:
    """Check at start-up that JARVIS_SECRET_KEY is valid and decrypts every stored secret; return their number.

    Raises SecretKeyInvalid for a malformed key, and SecretKeyMismatch when secrets are stored and
    the key is missing or cannot decrypt one of them. Without stored secrets a missing key is fine.
    """
    cipher = SecretCipher(key) if key is not None else None
    async with sessionmaker() as session:
        count = await session.scalar(select(func.count()).select_from(SpecSecret)) or 0
        if count == 0:
            return 0
        if cipher is None:
            raise SecretKeyMismatch(
                f"{count} deployment secrets are stored in the database, but JARVIS_SECRET_KEY is not set. "
                "Set it to the key that encrypted them before starting the service"
            )

        failed = 0
        first: SpecSecret | None = None
        rows = (await session.execute(select(SpecSecret).order_by(SpecSecret.created_at))).scalars()
        for row in rows:
            try:
                cipher.decrypt(row.ciphertext, row.name)
            except SecretError:
                failed += 1
                first = first or row
    if first is not None:
        raise SecretKeyMismatch(
            f"JARVIS_SECRET_KEY cannot decrypt {failed} of the {count} stored deployment secrets "
            f"(the first is {first.name!r} of spec {first.spec_id}). Set it to the key that encrypted them "
            "before starting the service"
        )
    return count


async def ensure_secret_key(
    sessionmaker: async_sessionmaker[AsyncSession], key: SecretStr | None, component: str
) -> None:
    """Run `check_secret_key` at the start of `component` (api or worker), logging the outcome; re-raises its error."""
    try:
        count = await check_secret_key(sessionmaker, key)
    except SecretError as error:
        logger.error("secrets.start_refused", component=component, reason=str(error))
        raise
    logger.info("secrets.key_checked", component=component, stored_secrets=count, key_set=key is not None)
