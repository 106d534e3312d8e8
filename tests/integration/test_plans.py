"""Deployment plans: rendered YAML, checksum and diff against the live spec, with nothing stored or queued."""

import hashlib
from typing import Any

import asyncpg
import pytest

from tests.conftest import (
    api_client,
    app_image,
    create_token,
    free_port,
    wait_for_status,
)

pytestmark = pytest.mark.integration

PLAN = "/api/jarvis/deployments/plan"
DEPLOY = "/api/jarvis/deployments/deploy"
HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 50}


def plan_body(project: dict, **fields: Any) -> dict[str, Any]:
    return {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": 18080, **fields}


async def stored_counts(database_url: str, project: dict) -> dict[str, int]:
    """Count the project's deployments and specs, and every stored secret, straight from the database."""
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return {
            "deployments": await connection.fetchval(
                "SELECT count(*) FROM deployments WHERE project_id = $1", project["id"]
            ),
            "compose_specs": await connection.fetchval(
                "SELECT count(*) FROM compose_specs WHERE project_id = $1", project["id"]
            ),
            "spec_secrets": await connection.fetchval("SELECT count(*) FROM spec_secrets"),
        }
    finally:
        await connection.close()


async def test_plan_without_live_spec(client, project, database_url):
    before = await stored_counts(database_url, project)

    response = await client.post(PLAN, json=plan_body(project))

    assert response.status_code == 200, response.text
    plan = response.json()
    assert set(plan) == {"yaml", "checksum", "live_checksum", "diff"}
    assert plan["live_checksum"] is None
    assert plan["checksum"] == hashlib.sha256(plan["yaml"].encode()).hexdigest()
    assert app_image("v1") in plan["yaml"]
    diff_lines = plan["diff"].splitlines()
    assert diff_lines[:2] == ["--- live", "+++ planned"]
    assert all(line.startswith(("+", "@@")) for line in diff_lines[2:])
    assert len([line for line in diff_lines[2:] if line.startswith("+")]) == len(plan["yaml"].splitlines())
    assert await stored_counts(database_url, project) == before


async def test_plan_checksum_matches_deploy(client, project):
    body = plan_body(project, host_port=free_port())
    plan = (await client.post(PLAN, json=body)).json()

    deployed = await client.post(DEPLOY, json=body)
    assert deployed.status_code == 202, deployed.text

    assert deployed.json()["checksum"] == plan["checksum"]
    stop = await client.post(f"/api/jarvis/deployments/{deployed.json()['id']}/stop")
    assert stop.status_code == 202


async def test_identical_input_identical_plan(client, project):
    body = plan_body(project, environment={"B": "2", "A": "1 $HOME"}, domain=["b.example.test", "a.example.test"])

    first = await client.post(PLAN, json=body)
    second = await client.post(PLAN, json=body)

    assert first.status_code == 200, first.text
    assert first.content == second.content


async def test_plan_with_secrets_stores_nothing(client, project, database_url):
    before = await stored_counts(database_url, project)
    value = "plan-secret-value-7f3a9c"

    response = await client.post(PLAN, json=plan_body(project, secrets={"DB_PASSWORD": value}))

    assert response.status_code == 200, response.text
    assert value not in response.text
    assert '"DB_PASSWORD": "jarvis-secret:hmac-sha256:' in response.json()["yaml"]
    assert await stored_counts(database_url, project) == before


async def test_plan_secrets_without_key_503(api, client, project, settings):
    from jarvis_deploy.api.deps import get_settings

    api.dependency_overrides[get_settings] = lambda: settings.model_copy(update={"secret_key": None})
    try:
        response = await client.post(PLAN, json=plan_body(project, secrets={"DB_PASSWORD": "abcdefgh"}))
    finally:
        api.dependency_overrides.pop(get_settings)

    assert response.status_code == 503, response.text
    assert response.json()["type"].endswith("/secrets-not-configured")


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"volumes": [{"source": "/etc", "target": "/host-etc"}]}, "body.volumes.0.source", "JARVIS_ALLOWED_BIND_ROOTS"),
        ({"volumes": [{"source": "/run", "target": "/host-run"}]}, "body.volumes.0.source", "Docker socket"),
        ({"host_port": 80}, "body.host_port", "host port 80 is below 1024"),
        ({"privileged": True}, "body.privileged", "Extra inputs are not permitted"),
    ],
)
async def test_plan_policy_violation_rejected(client, project, database_url, fields, field, message):
    before = await stored_counts(database_url, project)

    planned = await client.post(PLAN, json=plan_body(project, **fields))
    deployed = await client.post(DEPLOY, json=plan_body(project, **fields))

    assert planned.status_code == 422, planned.text
    assert planned.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in planned.json()["errors"]] == [field]
    assert message in planned.json()["errors"][0]["message"]
    assert deployed.status_code == 422
    assert planned.json()["errors"] == deployed.json()["errors"]
    assert await stored_counts(database_url, project) == before


async def test_plan_unknown_project_rejected(client):
    body = {"project_id": "00000000-0000-4000-8000-000000000000", "image_ref": app_image("v1"), "port": 8080}

    response = await client.post(PLAN, json=body)

    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "body.project_id"


async def test_plan_checks_scope_and_project(api, project, service_env):
    other_project = create_token(service_env, f"plan-other-{project['name']}", ["deploy"], ["someone-else"])
    reader = create_token(service_env, f"plan-reader-{project['name']}", ["read"])
    own_project = create_token(service_env, f"plan-own-{project['name']}", ["deploy"], [project["name"]])

    for token, expected in ((other_project, 403), (reader, 403), (own_project, 200)):
        async with api_client(api, token) as http:
            response = await http.post(PLAN, json=plan_body(project))
        assert response.status_code == expected, response.text


@pytest.mark.usefixtures("worker")
async def test_plan_diff_against_live(client, project, database_url):
    port = free_port()
    live_body = plan_body(project, host_port=port, healthcheck=HEALTH)
    accepted = await client.post(DEPLOY, json=live_body)
    assert accepted.status_code == 202, accepted.text
    done = await wait_for_status(client, accepted.json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    before = await stored_counts(database_url, project)

    unchanged = (await client.post(PLAN, json=live_body)).json()
    changed = (await client.post(PLAN, json={**live_body, "image_ref": app_image("v2")})).json()

    assert unchanged["live_checksum"] == done["checksum"]
    assert unchanged["checksum"] == done["checksum"]
    assert unchanged["diff"] == ""
    assert changed["live_checksum"] == done["checksum"]
    assert changed["checksum"] != done["checksum"]
    removed = [line for line in changed["diff"].splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line for line in changed["diff"].splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any(app_image("v1") in line for line in removed), changed["diff"]
    assert any(app_image("v2") in line for line in added), changed["diff"]
    assert await stored_counts(database_url, project) == before
