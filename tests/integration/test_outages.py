"""With the database, Redis or the Docker Engine unreachable, the API answers 503 with Retry-After, never 500."""

import secrets

import pytest

from tests.conftest import api_client, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def api_with(settings):
    """Start an in-process API whose settings differ from the test service's in the given fields."""
    from jarvis_deploy.api.app import create_app

    started = []

    async def start(**changes):
        app = create_app(settings.model_copy(update=changes))
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        started.append(context)
        return app

    yield start
    for context in started:
        await context.__aexit__(None, None, None)


async def test_database_down_is_503(api_with, admin_token):
    app = await api_with(database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/jarvis_nothing")

    async with api_client(app, admin_token) as client:
        projects = await client.get("/api/jarvis/projects")
        ready = await client.get("/readyz")
        alive = await client.get("/healthz")

    assert projects.status_code == 503
    assert projects.headers["retry-after"]
    assert projects.headers["content-type"] == "application/problem+json"
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("down")
    assert ready.json()["checks"]["redis"] == "ok"
    assert alive.status_code == 200


async def test_redis_down_still_accepts_deploy(api_with, admin_token, client, project):
    app = await api_with(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    body = {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080}

    async with api_client(app, admin_token) as degraded:
        accepted = await degraded.post("/api/jarvis/deployments/deploy", json={**body, "host_port": free_port()})
        ready = await degraded.get("/readyz")

    assert accepted.status_code == 202
    assert accepted.json()["status"] == "queued"
    stored = await client.get(f"/api/jarvis/deployments/{accepted.json()['id']}")
    assert stored.status_code == 200
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("down")


async def test_docker_down_logs_is_503(api_with, admin_token, client, project):
    app = await api_with(docker_url=f"unix:///tmp/jarvis-no-docker-{secrets.token_hex(4)}.sock")
    body = {"project_id": project["id"], "image_ref": "localhost:5000/jarvis-testapp:v1", "port": 8080}
    accepted = await client.post("/api/jarvis/deployments/deploy", json={**body, "host_port": free_port()})

    async with api_client(app, admin_token) as degraded:
        logs = await degraded.get(f"/api/jarvis/deployments/{accepted.json()['id']}/logs")
        ready = await degraded.get("/readyz")

    assert logs.status_code == 503
    assert logs.headers["retry-after"]
    assert ready.json()["checks"]["docker"].startswith("down")
