"""Encryption of secret values and the placeholders that stand for them in the stored Compose YAML.

Pure: no database or Docker access. Nothing here logs, and no error message contains a key or a value.
"""

import base64
import binascii
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

# The placeholder has no `$`, so Compose does not interpolate it, and `docker compose` run on the
# stored YAML passes it to the container literally.
PLACEHOLDER_PREFIX = "jarvis-secret:hmac-sha256:"
# HKDF `info` of the placeholder key, so that it differs from both halves of the Fernet key.
PLACEHOLDER_KEY_INFO = b"jarvis-deploy secret placeholder v1"
GENERATE_KEY_HINT = "python3 -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class SecretError(Exception):
    """A secret cannot be encrypted, decrypted or matched. The message names keys, never values."""


class SecretKeyInvalid(SecretError):
    """JARVIS_SECRET_KEY is not a Fernet key."""


class SecretDecryptionFailed(SecretError):
    """A stored ciphertext was not encrypted with the configured key, or was changed."""


class SecretCipher:
    """Fernet encryption with JARVIS_SECRET_KEY, and HMAC-SHA256 placeholders keyed by a key derived from it."""

    def __init__(self, key: SecretStr) -> None:
        text = key.get_secret_value().strip()
        try:
            raw = base64.urlsafe_b64decode(text.encode("ascii"))
            self._fernet = Fernet(text.encode("ascii"))
        except (ValueError, binascii.Error):
            # `from None`: the underlying error may quote part of the key.
            raise SecretKeyInvalid(
                "JARVIS_SECRET_KEY is not a valid Fernet key: expected 32 bytes in URL-safe base64 "
                f"(44 characters). Generate one with: {GENERATE_KEY_HINT}"
            ) from None
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PLACEHOLDER_KEY_INFO)
        self._placeholder_key = hkdf.derive(raw)

    def encrypt(self, value: str) -> str:
        """Encrypt a value. The Fernet token is URL-safe base64 text and differs on every call."""
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, name: str) -> str:
        """Decrypt the stored ciphertext of the secret `name`."""
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretDecryptionFailed(
                f"the stored value of secret {name!r} cannot be decrypted with JARVIS_SECRET_KEY; "
                "set JARVIS_SECRET_KEY to the key that encrypted it"
            ) from None

    def placeholder(self, name: str, value: str) -> str:
        """Return the placeholder of a secret: a keyed HMAC of its name and value.

        The name is part of the message, so two secrets with the same value get different
        placeholders and the YAML does not show that they are equal.
        """
        message = name.encode("utf-8") + b"\x00" + value.encode("utf-8")
        digest = hmac.new(self._placeholder_key, message, hashlib.sha256).hexdigest()
        return PLACEHOLDER_PREFIX + digest


def is_placeholder(value: str) -> bool:
    return value.startswith(PLACEHOLDER_PREFIX)
