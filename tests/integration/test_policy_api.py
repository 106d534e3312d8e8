"""The safety policy through the API: rejected requests get a problem document naming the field and store nothing."""

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import app_image

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
DEPLOY = "/api/jarvis/deployments/deploy"


def deploy_body(project: dict, **fields: Any) -> dict[str, Any]:
    return {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": 18080, **fields}


async def assert_nothing_stored(client, project: dict) -> None:
    response = await client.get("/api/jarvis/deployments", params={"project_id": project["id"]})

    assert response.status_code == 200
    assert response.json()["items"] == []


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {"volumes": [{"source": "/etc", "target": "/host-etc"}]},
            "body.volumes.0.source",
            "JARVIS_ALLOWED_BIND_ROOTS",
        ),
        (
            {"volumes": [{"source": "data", "target": "/data"}, {"source": "/var/run/docker.sock", "target": "/s"}]},
            "body.volumes.1.source",
            "Docker socket",
        ),
        ({"volumes": [{"source": "/run", "target": "/host-run"}]}, "body.volumes.0.source", "Docker socket"),
        ({"host_port": 80}, "body.host_port", "host port 80 is below 1024"),
        ({"port": 443, "host_port": None}, "body.port", "host port 443 is below 1024"),
        ({"privileged": True}, "body.privileged", "Extra inputs are not permitted"),
        ({"network_mode": "host"}, "body.network_mode", "Extra inputs are not permitted"),
        ({"pid": "host"}, "body.pid", "Extra inputs are not permitted"),
        ({"ipc": "host"}, "body.ipc", "Extra inputs are not permitted"),
        ({"cap_add": ["SYS_ADMIN"]}, "body.cap_add", "Extra inputs are not permitted"),
        ({"devices": ["/dev/sda:/dev/sda"]}, "body.devices", "Extra inputs are not permitted"),
    ],
)
async def test_deploy_policy_violation_rejected(client, project, fields, field, message):
    response = await client.post(DEPLOY, json=deploy_body(project, **fields))

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == [field]
    assert message in errors[0]["message"]
    await assert_nothing_stored(client, project)


async def test_deploy_bind_escape_with_dotdot_rejected(client, project, settings):
    root = settings.allowed_bind_roots[0]
    source = f"{root}/../../etc"

    response = await client.post(DEPLOY, json=deploy_body(project, volumes=[{"source": source, "target": "/x"}]))

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body.volumes.0.source"
    assert "outside the allowed bind roots" in response.json()["detail"]
    await assert_nothing_stored(client, project)


async def test_deploy_disallowed_registry_rejected(api, client, project):
    settings = api.state.settings
    original = settings.allowed_registries
    settings.allowed_registries = ["registry.example.com"]
    try:
        response = await client.post(DEPLOY, json=deploy_body(project))
    finally:
        settings.allowed_registries = original

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["errors"][0]["field"] == "body.image_ref"
    assert "JARVIS_ALLOWED_REGISTRIES" in response.json()["detail"]
    await assert_nothing_stored(client, project)


def oversized_body(project: dict, settings, factor: int = 1) -> bytes:
    padding = "x" * (settings.max_body_bytes * factor + 1)
    return json.dumps(deploy_body(project, environment={"PADDING": padding})).encode()


async def test_oversized_body_with_content_length_is_413(client, project, settings):
    body = oversized_body(project, settings)

    response = await client.post(DEPLOY, content=body, headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["status"] == 413
    assert "request body is larger than" in response.json()["detail"]
    assert "JARVIS_MAX_BODY_BYTES" in response.json()["detail"]
    await assert_nothing_stored(client, project)


async def test_oversized_body_without_content_length_is_413(client, project, settings):
    body = oversized_body(project, settings, factor=3)
    chunk_size = 64 * 1024
    chunks = [body[start : start + chunk_size] for start in range(0, len(body), chunk_size)]
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for chunk in chunks:
            sent += 1
            yield chunk

    response = await client.post(DEPLOY, content=stream(), headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert "JARVIS_MAX_BODY_BYTES" in response.json()["detail"]
    assert sent <= settings.max_body_bytes // chunk_size + 1
    assert sent < len(chunks)
    await assert_nothing_stored(client, project)


async def test_body_under_limit_is_read(client, project, settings):
    # Eight values of 60,000 characters: under the body limit and under the 65,536 characters allowed per value.
    environment = {f"PADDING_{index}": "x" * 60_000 for index in range(8)}
    assert len(json.dumps(environment)) < settings.max_body_bytes

    response = await client.post(DEPLOY, json=deploy_body(project, host_port=80, environment=environment))

    # Reaches the policy, so the body was read in full; the privileged port is what fails.
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body.host_port"
