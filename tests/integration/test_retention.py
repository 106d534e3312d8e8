"""Retention keeps the spec and events of each project's latest deployments; older ones keep their summary."""

import asyncio
import secrets
import time
import uuid

import pytest
from sqlalchemy import func, select

from jarvis_deploy.api.app import create_app
from jarvis_deploy.config import Settings
from jarvis_deploy.db.models import ComposeSpec
from jarvis_deploy.deployments.retention import prune_project
from jarvis_deploy.deployments.runner import WorkerContext
from tests.conftest import (
    api_client,
    app_image,
    free_port,
    settle_project,
    start_worker,
)
from tests.integration.test_deploy_flow import HEALTH
from tests.integration.test_unchanged import deploy_and_wait

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]



async def spec_count(context: WorkerContext, project_id: str) -> int:
    async with context.sessionmaker() as session:
        return await session.scalar(
            select(func.count()).select_from(ComposeSpec).where(ComposeSpec.project_id == uuid.UUID(project_id))
        )


async def test_prune_keeps_summaries_and_used_specs(client, project, context):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    greetings = ["a", "b", "a", "c"]
    done = [await deploy_and_wait(client, {**body, "environment": {"GREETING": greeting}}) for greeting in greetings]
    assert [item["status"] for item in done] == ["succeeded"] * 4
    assert done[0]["checksum"] == done[2]["checksum"]
    assert await spec_count(context, project["id"]) == 3

    pruned = await prune_project(context.sessionmaker, uuid.UUID(project["id"]), keep=2)

    assert pruned == 2
    # The spec of "a" stays, because version 3 (kept) uses it; the spec of "b" goes.
    assert await spec_count(context, project["id"]) == 2
    history = (await client.get(f"/api/jarvis/projects/{project['id']}/deployments")).json()["items"]
    assert [item["version"] for item in history] == [4, 3, 2, 1]
    assert [item["pruned_at"] is not None for item in history] == [False, False, True, True]
    assert [item["status"] for item in history] == ["succeeded", "superseded", "superseded", "superseded"]
    assert history[3]["checksum"] == done[0]["checksum"]

    old = (await client.get(f"/api/jarvis/deployments/{done[1]['id']}")).json()
    assert old["events"] == []
    stream = await client.get(
        f"/api/jarvis/deployments/{done[1]['id']}/events", headers={"Accept": "text/event-stream"}
    )
    assert stream.status_code == 204
    compose = await client.get(f"/api/jarvis/deployments/{done[1]['id']}/compose")
    assert compose.status_code == 410
    assert "retention" in compose.json()["detail"]
    rollback = await client.post(f"/api/jarvis/deployments/{done[1]['id']}/rollback")
    assert rollback.status_code == 410, rollback.text
    assert (await client.get(f"/api/jarvis/deployments/{done[2]['id']}/compose")).status_code == 200

    assert await prune_project(context.sessionmaker, uuid.UUID(project["id"]), keep=2) == 0
    assert await prune_project(context.sessionmaker, uuid.UUID(project["id"]), keep=0) == 0

    # A kept deployment can still be rolled back to.
    again = await client.post(f"/api/jarvis/deployments/{done[2]['id']}/rollback")
    assert again.status_code == 202, again.text
    await settle_project(client, project["id"])


async def test_prune_never_touches_live_or_queued_deployments(client, project, context):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    live = await deploy_and_wait(client, body)

    assert await prune_project(context.sessionmaker, uuid.UUID(project["id"]), keep=1) == 0
    assert await prune_project(context.sessionmaker, uuid.UUID(project["id"]), keep=1) == 0
    detail = (await client.get(f"/api/jarvis/deployments/{live['id']}")).json()
    assert detail["pruned_at"] is None
    assert detail["events"]


@pytest.fixture
async def retaining_worker(service_env, settings: Settings, admin_token, tmp_path):
    """An API and a worker on a queue of their own; the worker keeps the specs of two deployments per project."""
    queue = f"jarvis-test-retain-{secrets.token_hex(4)}"
    env = {**service_env, "JARVIS_QUEUE_NAME": queue, "JARVIS_RETAIN_DEPLOYMENTS": "2"}
    worker = start_worker(env, tmp_path / "worker.log")
    app = create_app(settings.model_copy(update={"queue_name": queue}))
    try:
        async with app.router.lifespan_context(app), api_client(app, admin_token) as client:
            yield client
    finally:
        worker.terminate()
        worker.wait(timeout=30)


async def test_worker_prunes_after_each_deployment(client, project, retaining_worker):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    done = [await deploy_and_wait(retaining_worker, {**body, "environment": {"GREETING": str(number)}}) for number in range(3)]
    assert [item["status"] for item in done] == ["succeeded"] * 3

    deadline = time.monotonic() + 30
    oldest = done[0]
    while time.monotonic() < deadline and oldest["pruned_at"] is None:
        await asyncio.sleep(0.2)
        oldest = (await client.get(f"/api/jarvis/deployments/{done[0]['id']}")).json()

    assert oldest["pruned_at"] is not None
    assert oldest["events"] == []
    kept = (await client.get(f"/api/jarvis/deployments/{done[1]['id']}")).json()
    assert kept["pruned_at"] is None
    assert kept["events"]
