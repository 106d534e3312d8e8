"""Secrets without services: encryption, placeholders, rendering, injection, redaction and request validation."""

import secrets
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from pydantic import SecretStr, ValidationError

from jarvis_deploy.compose.render import RenderOptions, render, validate_document
from jarvis_deploy.deployments.schemas import DeployRequest
from jarvis_deploy.engine.errors import TranslationError
from jarvis_deploy.engine.translate import container_config, inject_secrets
from jarvis_deploy.secrets.cipher import (
    PLACEHOLDER_PREFIX,
    SecretCipher,
    SecretDecryptionFailed,
    SecretKeyInvalid,
)
from jarvis_deploy.secrets.store import (
    REDACTED,
    SecretsNotConfigured,
    redact,
    request_cipher,
)

KEY = SecretStr(Fernet.generate_key().decode())
OTHER_KEY = SecretStr(Fernet.generate_key().decode())
PROJECT = "shop"
BASE_REQUEST: dict[str, Any] = {
    "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
    "image_ref": "localhost:5000/testapp:v1",
    "port": 8080,
}


def secret_value() -> str:
    return "s3cr3t-" + secrets.token_hex(8)


def build(**changes: Any) -> DeployRequest:
    return DeployRequest.model_validate({**BASE_REQUEST, **changes})


def render_secrets(values: dict[str, str], key: SecretStr = KEY):
    return render(build(secrets=values), PROJECT, RenderOptions(proxy_network="caddy", secret_key=key))


def test_cipher_round_trip():
    cipher = SecretCipher(KEY)
    value = secret_value()

    token = cipher.encrypt(value)

    assert value not in token
    assert cipher.decrypt(token, "API_TOKEN") == value
    assert cipher.encrypt(value) != token, "Fernet tokens carry a random IV"


def test_cipher_wrong_key_names_secret_only():
    value = secret_value()
    token = SecretCipher(KEY).encrypt(value)

    with pytest.raises(SecretDecryptionFailed) as raised:
        SecretCipher(OTHER_KEY).decrypt(token, "API_TOKEN")

    assert "'API_TOKEN'" in str(raised.value)
    assert value not in str(raised.value)
    assert OTHER_KEY.get_secret_value() not in str(raised.value)


@pytest.mark.parametrize("key", ["", "short", "x" * 44, Fernet.generate_key().decode()[:-2]])
def test_cipher_rejects_malformed_key(key: str):
    with pytest.raises(SecretKeyInvalid) as raised:
        SecretCipher(SecretStr(key))

    assert "JARVIS_SECRET_KEY is not a valid Fernet key" in str(raised.value)
    if key:
        assert key not in str(raised.value)


def test_placeholder_is_keyed_hmac():
    cipher = SecretCipher(KEY)
    value = secret_value()

    placeholder = cipher.placeholder("API_TOKEN", value)

    assert placeholder.startswith(PLACEHOLDER_PREFIX)
    assert len(placeholder) == len(PLACEHOLDER_PREFIX) + 64
    assert value not in placeholder
    assert "$" not in placeholder, "Compose would interpolate a `$`"
    assert placeholder == cipher.placeholder("API_TOKEN", value)
    assert placeholder != cipher.placeholder("API_TOKEN", value + "x")
    assert placeholder != cipher.placeholder("OTHER_NAME", value), "equal values must not look equal"
    assert placeholder != SecretCipher(OTHER_KEY).placeholder("API_TOKEN", value)


def test_render_keeps_value_out_of_yaml():
    value = secret_value()

    rendered = render_secrets({"API_TOKEN": value})

    assert value not in rendered.yaml
    assert value not in repr(rendered.document)
    environment = rendered.document["services"][PROJECT]["environment"]
    assert environment["API_TOKEN"] == SecretCipher(KEY).placeholder("API_TOKEN", value)
    validate_document(yaml.safe_load(rendered.yaml))


def test_render_checksum_follows_value():
    value = secret_value()

    first = render_secrets({"API_TOKEN": value})
    same = render_secrets({"API_TOKEN": value})
    changed = render_secrets({"API_TOKEN": value + "-rotated"})
    other_key = render_secrets({"API_TOKEN": value}, OTHER_KEY)

    assert first.checksum == same.checksum
    assert first.checksum != changed.checksum
    assert first.checksum != other_key.checksum


def test_render_without_key_raises():
    with pytest.raises(ValueError, match="no secret key"):
        render(build(secrets={"API_TOKEN": secret_value()}), PROJECT, RenderOptions(proxy_network="caddy"))


def test_request_cipher_without_key_is_503():
    with pytest.raises(SecretsNotConfigured) as raised:
        request_cipher(None)

    assert raised.value.status_code == 503
    assert "JARVIS_SECRET_KEY" in raised.value.detail


def test_request_cipher_malformed_key_is_503():
    with pytest.raises(SecretsNotConfigured) as raised:
        request_cipher(SecretStr("not-a-key"))

    assert "not a valid Fernet key" in raised.value.detail
    assert "not-a-key" not in raised.value.detail


def test_inject_replaces_placeholder():
    value = secret_value()
    rendered = render_secrets({"API_TOKEN": value, "OTHER": "x$y"})
    body = container_config(rendered.document, PROJECT, {}).body

    inject_secrets(body, {"API_TOKEN": SecretStr(value), "OTHER": SecretStr("x$y")})

    assert f"API_TOKEN={value}" in body["Env"]
    assert "OTHER=x$y" in body["Env"]
    assert not any(PLACEHOLDER_PREFIX in entry for entry in body["Env"])


def test_inject_missing_entry_raises():
    body = {"Env": ["PLAIN=1"]}

    with pytest.raises(TranslationError, match="API_TOKEN"):
        inject_secrets(body, {"API_TOKEN": SecretStr(secret_value())})


def test_redact_long_values_only():
    value = secret_value()
    text = f"crash: token={value}, flag=on"

    redacted = redact(text, {"API_TOKEN": SecretStr(value), "FLAG": SecretStr("on")})

    assert value not in redacted
    assert redacted == f"crash: token={REDACTED}, flag=on"


def test_request_masks_secret_in_repr():
    value = secret_value()

    request = build(secrets={"API_TOKEN": value})

    assert value not in repr(request)
    assert value not in request.model_dump_json()
    assert request.secrets["API_TOKEN"].get_secret_value() == value


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secrets": {"K": 1}}, "valid string"),
        ({"secrets": {"K": True}}, "valid string"),
        ({"secrets": {"K": None}}, "valid string"),
        ({"secrets": {"K": "a\x00b"}}, "must not contain NUL"),
        ({"secrets": {"K": "x" * 65537}}, "longer than 65536"),
        ({"secrets": {"A=B": "x"}}, "must not contain '='"),
        ({"secrets": {"": "x"}}, "at least 1 character"),
        ({"secrets": {f"K{i}": "x" for i in range(501)}}, "at most 500"),
        ({"environment": {"K": "x"}, "secrets": {"K": "y"}}, "either environment or secrets"),
        ({"environment": {"K": PLACEHOLDER_PREFIX + "00"}}, "marks secret placeholders"),
    ],
)
def test_request_rejects_invalid_secrets(changes: dict[str, Any], message: str):
    with pytest.raises(ValidationError) as raised:
        build(**changes)

    messages = [error["msg"] for error in raised.value.errors()]
    assert any(message in text for text in messages), messages
