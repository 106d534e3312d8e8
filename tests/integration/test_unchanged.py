"""Redeploying what already runs: a no-op unless `force`, and never when the live containers are not healthy."""

import aiodocker
import httpx
import pytest

from jarvis_deploy.deployments import recovery
from tests.conftest import app_image, free_port, wait_for_event, wait_for_status
from tests.integration.test_deploy_flow import HEALTH, containers_of
from tests.integration.test_history import served_version

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

FINAL = {"succeeded", "failed", "rolled_back"}



async def deploy_and_wait(client: httpx.AsyncClient, body: dict) -> dict:
    accepted = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert accepted.status_code == 202, accepted.text
    return await wait_for_status(client, accepted.json()["id"], FINAL)


async def container_ids(docker: aiodocker.Docker, project: dict) -> set[str]:
    return {container.id for container in await containers_of(docker, project["name"])}


async def test_same_request_keeps_containers(client, project, docker, context):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    first = await deploy_and_wait(client, body)
    assert first["status"] == "succeeded", first
    before = await container_ids(docker, project)

    second = await deploy_and_wait(client, body)

    assert second["status"] == "succeeded", second
    assert second["reused_from"] == first["id"]
    assert second["image_digest"] == first["image_digest"]
    stages = [event["stage"] for event in second["events"]]
    assert "unchanged" in stages
    assert "started" not in stages
    assert "pulling" not in stages
    assert await container_ids(docker, project) == before
    assert (await client.get(f"/api/jarvis/deployments/{first['id']}")).json()["status"] == "superseded"
    assert await served_version(port) == "v1"

    # The containers now serve the no-op deployment: its logs are theirs, and the reconciler keeps them.
    logs = await client.get(f"/api/jarvis/deployments/{second['id']}/logs")
    assert any("listening" in line["text"] for line in logs.json()["lines"]), logs.text
    await recovery.remove_orphans(context)
    assert await container_ids(docker, project) == before

    # Stopping the no-op deployment stops the containers that serve it.
    stopped = await client.post(f"/api/jarvis/deployments/{second['id']}/stop")
    assert stopped.status_code == 202, stopped.text
    assert (await wait_for_status(client, second["id"], {"stopped"}))["status"] == "stopped"
    assert await container_ids(docker, project) == set()


async def test_force_runs_the_same_request_again(client, project, docker):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    first = await deploy_and_wait(client, body)
    before = await container_ids(docker, project)

    forced = await deploy_and_wait(client, {**body, "force": True})

    assert forced["status"] == "succeeded", forced
    assert forced["force"] is True
    assert forced["reused_from"] is None
    stages = [event["stage"] for event in forced["events"]]
    assert "unchanged" not in stages
    assert "started" in stages
    await wait_for_event(client, forced["id"], "removed_old")
    after = await container_ids(docker, project)
    assert after
    assert not after & before
    assert (await client.get(f"/api/jarvis/deployments/{first['id']}")).json()["status"] == "superseded"
    assert await served_version(port) == "v1"


async def test_stopped_live_container_is_replaced_not_reused(client, project, docker):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    first = await deploy_and_wait(client, body)
    (live,) = await containers_of(docker, project["name"])
    await live.stop(t=1)

    second = await deploy_and_wait(client, body)

    assert second["status"] == "succeeded", second
    assert second["reused_from"] is None
    assert "unchanged" not in [event["stage"] for event in second["events"]]
    await wait_for_event(client, second["id"], "removed_old")
    assert live.id not in await container_ids(docker, project)
    assert await served_version(port) == "v1"
    assert first["id"] != second["id"]


async def test_changed_environment_is_not_a_noop(client, project):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    first = await deploy_and_wait(client, body)

    second = await deploy_and_wait(client, {**body, "environment": {"GREETING": "changed"}})

    assert second["status"] == "succeeded", second
    assert second["checksum"] != first["checksum"]
    assert second["reused_from"] is None
