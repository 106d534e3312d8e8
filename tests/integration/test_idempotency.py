"""Idempotency-Key on deploy: replays return the original deployment; a changed body is rejected."""

import asyncio
import secrets

import pytest

pytestmark = pytest.mark.integration


def deploy_body(project: dict, **fields) -> dict:
    return {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080, **fields}


async def deployments_of(client, project: dict) -> list[dict]:
    response = await client.get("/api/jarvis/deployments", params={"project_id": project["id"]})
    return response.json()["items"]


async def test_same_key_same_body_replays(client, project):
    key = secrets.token_hex(8)
    body = deploy_body(project, host_port=20000 + secrets.randbelow(20000))

    first = await client.post("/api/jarvis/deployments/deploy", json=body, headers={"Idempotency-Key": key})
    second = await client.post("/api/jarvis/deployments/deploy", json=body, headers={"Idempotency-Key": key})

    assert first.status_code == 202
    assert second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(await deployments_of(client, project)) == 1


async def test_same_key_other_body_rejected(client, project):
    key = secrets.token_hex(8)
    port = 20000 + secrets.randbelow(20000)

    first = await client.post(
        "/api/jarvis/deployments/deploy", json=deploy_body(project, host_port=port), headers={"Idempotency-Key": key}
    )
    second = await client.post(
        "/api/jarvis/deployments/deploy", json=deploy_body(project, host_port=port + 1), headers={"Idempotency-Key": key}
    )

    assert first.status_code == 202
    assert second.status_code == 422
    assert second.json()["errors"][0]["field"] == "header.Idempotency-Key"
    assert len(await deployments_of(client, project)) == 1


async def test_concurrent_same_key_creates_one(client, project):
    key = secrets.token_hex(8)
    body = deploy_body(project, host_port=20000 + secrets.randbelow(20000))

    responses = await asyncio.gather(
        *[client.post("/api/jarvis/deployments/deploy", json=body, headers={"Idempotency-Key": key}) for _ in range(4)]
    )

    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {202, 409}
    assert {response.json()["id"] for response in responses if response.status_code == 202} == {
        item["id"] for item in await deployments_of(client, project)
    }
    assert len(await deployments_of(client, project)) == 1


async def test_without_key_each_request_creates(client, project):
    body = deploy_body(project, host_port=20000 + secrets.randbelow(20000))

    await client.post("/api/jarvis/deployments/deploy", json=body)
    await client.post("/api/jarvis/deployments/deploy", json=body)

    assert len(await deployments_of(client, project)) == 2
