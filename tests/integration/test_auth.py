"""Bearer tokens, scopes, per-project tokens, revocation and the audit trail."""

import secrets
import subprocess
import sys
import uuid

import asyncpg
import pytest

from tests.conftest import ROOT, api_client, create_token

pytestmark = pytest.mark.integration

PROTECTED = [
    ("GET", "/api/jarvis/projects"),
    ("POST", "/api/jarvis/projects"),
    ("GET", "/api/jarvis/deployments"),
    ("POST", "/api/jarvis/deployments/deploy"),
    ("GET", f"/api/jarvis/deployments/{uuid.uuid4()}"),
    ("POST", f"/api/jarvis/deployments/{uuid.uuid4()}/stop"),
    ("GET", f"/api/jarvis/deployments/{uuid.uuid4()}/logs"),
    ("GET", f"/api/jarvis/deployments/{uuid.uuid4()}/compose"),
    ("GET", "/api/jarvis/tokens"),
    ("POST", "/api/jarvis/tokens"),
    ("GET", "/api/jarvis/audit"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("token", [None, "jd_not-a-real-token"])
async def test_protected_endpoint_needs_token(api, method, path, token):
    async with api_client(api, token) as anonymous:
        response = await anonymous.request(method, path, json={})

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/openapi.json"])
async def test_open_endpoints_need_no_token(api, path):
    async with api_client(api) as anonymous:
        response = await anonymous.get(path)

    assert response.status_code == 200


async def test_openapi_declares_bearer_scheme(client):
    document = (await client.get("/openapi.json")).json()

    schemes = document["components"]["securitySchemes"]
    bearer = [scheme for scheme in schemes.values() if scheme["type"] == "http" and scheme["scheme"] == "bearer"]
    assert len(bearer) == 1
    deploy = document["paths"]["/api/jarvis/deployments/deploy"]["post"]
    assert deploy["security"]


async def test_read_token_cannot_deploy(api, service_env, project):
    token = create_token(service_env, f"reader-{secrets.token_hex(3)}", ["read"])
    body = {"project_id": project["id"], "image_ref": "app:v1", "port": 8080}

    async with api_client(api, token) as reader:
        listed = await reader.get("/api/jarvis/projects")
        denied = await reader.post("/api/jarvis/deployments/deploy", json=body)

    assert listed.status_code == 200
    assert denied.status_code == 403
    assert "deploy" in denied.json()["detail"]


async def test_project_token_limited_to_its_project(api, client, service_env, project):
    other = (await client.post("/api/jarvis/projects", json={"name": f"t{secrets.token_hex(5)}"})).json()
    token = create_token(service_env, f"ci-{secrets.token_hex(3)}", ["deploy"], [project["name"]])
    body = {"image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080, "host_port": 1}

    async with api_client(api, token) as ci:
        projects = (await ci.get("/api/jarvis/projects")).json()
        other_project = await ci.get(f"/api/jarvis/projects/{other['id']}")
        other_deploy = await ci.post("/api/jarvis/deployments/deploy", json={**body, "project_id": other["id"]})
        create_project = await ci.post("/api/jarvis/projects", json={"name": f"t{secrets.token_hex(5)}"})

    assert [item["name"] for item in projects] == [project["name"]]
    assert other_project.status_code == 403
    assert other_deploy.status_code == 403
    assert create_project.status_code == 403


async def test_token_api_shows_token_once_and_revokes(api, client, database_url):
    name = f"api-made-{secrets.token_hex(3)}"

    created = await client.post("/api/jarvis/tokens", json={"name": name, "scopes": ["read"]})
    assert created.status_code == 201
    token = created.json()["token"]
    assert len(token) >= 43

    listed = (await client.get("/api/jarvis/tokens")).json()
    entry = next(item for item in listed if item["name"] == name)
    assert "token" not in entry

    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await connection.fetch("SELECT * FROM api_tokens")
    finally:
        await connection.close()
    assert all(token not in str(dict(row)) for row in rows)

    async with api_client(api, token) as holder:
        assert (await holder.get("/api/jarvis/projects")).status_code == 200
        revoked = await client.delete(f"/api/jarvis/tokens/{entry['id']}")
        assert revoked.status_code == 200
        assert (await holder.get("/api/jarvis/projects")).status_code == 401


async def test_duplicate_token_name_conflicts(client):
    name = f"dup-{secrets.token_hex(3)}"
    first = await client.post("/api/jarvis/tokens", json={"name": name, "scopes": ["read"]})
    second = await client.post("/api/jarvis/tokens", json={"name": name, "scopes": ["read"]})

    assert first.status_code == 201
    assert second.status_code == 409


async def test_audit_records_mutating_requests(api, client, service_env, project):
    token = create_token(service_env, f"auditee-{secrets.token_hex(3)}", ["read"])
    async with api_client(api, token) as reader:
        denied = await reader.post(f"/api/jarvis/deployments/{uuid.uuid4()}/stop")
    assert denied.status_code == 403

    records = (await client.get("/api/jarvis/audit", params={"limit": 50})).json()

    created = [r for r in records if r["path"] == "/api/jarvis/projects" and r["project"] == project["name"]]
    assert created[0]["token_name"] == "test-admin"
    assert created[0]["status_code"] == 201
    assert created[0]["method"] == "POST"
    refused = [r for r in records if r["token_name"] and r["token_name"].startswith("auditee-")]
    assert refused[0]["status_code"] == 403


def test_cli_rejects_unknown_scope(service_env):
    import os

    result = subprocess.run(
        [sys.executable, "-m", "jarvis_deploy.cli", "token", "create", "--name", "x", "--scope", "root"],
        capture_output=True,
        text=True,
        env={**os.environ, **service_env},
        cwd=ROOT,
    )

    assert result.returncode == 2
    assert "scopes" in result.stderr
