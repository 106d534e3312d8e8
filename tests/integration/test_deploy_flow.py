"""End to end: API, queue, a real worker process, the Docker Engine and the loopback registry."""

import hashlib
import secrets

import aiodocker
import httpx
import pytest

from tests.conftest import app_image, free_port, wait_for_event, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 50}


async def deploy(client: httpx.AsyncClient, project: dict, **fields) -> dict:
    body = {"project_id": project["id"], "port": 8080, **fields}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(f"/api/jarvis/deployments/{response.json()['id']}")
    return response.json()


async def containers_of(docker: aiodocker.Docker, project: str) -> list:
    return await docker.containers.list(all=True, filters={"label": [f"dev.jarvis-deploy.project={project}"]})


async def test_deploy_serves_logs_and_stops(client, project, docker):
    port = free_port()

    accepted = await deploy(client, project, image_ref=app_image("v1"), host_port=port, healthcheck=HEALTH)
    assert accepted["status"] == "queued"
    assert accepted["version"] == 1

    done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    stages = [event["stage"] for event in done["events"]]
    assert stages[0] == "queued"
    assert "started" in stages
    assert "healthy" in stages

    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    assert response.status_code == 200
    assert response.text.strip() == "v1"

    logs = await client.get(f"/api/jarvis/deployments/{accepted['id']}/logs", params={"tail": 50})
    assert logs.status_code == 200
    texts = [line["text"] for line in logs.json()["lines"]]
    assert any("testapp v1 listening on 8080" in text for text in texts), texts
    assert logs.json()["lines"][0]["container"] == f"{project['name']}-v1-1"

    compose = await client.get(f"/api/jarvis/deployments/{accepted['id']}/compose")
    assert compose.headers["content-type"].startswith("application/yaml")
    assert hashlib.sha256(compose.content).hexdigest() == accepted["checksum"]

    container = (await containers_of(docker, project["name"]))[0]
    labels = (await container.show())["Config"]["Labels"]
    assert labels["com.docker.compose.project"] == project["name"]
    assert labels["com.docker.compose.service"] == project["name"]
    assert labels["com.docker.compose.container-number"] == "1"
    assert labels["com.docker.compose.oneoff"] == "False"
    assert labels["dev.jarvis-deploy.deployment"] == accepted["id"]

    stop = await client.post(f"/api/jarvis/deployments/{accepted['id']}/stop")
    assert stop.status_code == 202
    stopped = await wait_for_status(client, accepted["id"], {"stopped"})
    assert stopped["status"] == "stopped"
    assert await containers_of(docker, project["name"]) == []


async def test_missing_image_fails_with_registry_error(client, project, docker):
    image = app_image(f"missing-{secrets.token_hex(4)}")

    accepted = await deploy(client, project, image_ref=image, host_port=free_port())
    done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})

    assert done["status"] == "failed"
    assert image in done["error"]
    assert "not found" in done["error"].lower() or "manifest unknown" in done["error"].lower(), done["error"]
    assert done["events"][-1]["stage"] == "failed"
    assert await containers_of(docker, project["name"]) == []


async def test_failed_health_check_restores_previous_version(client, project, docker):
    port = free_port()
    first = await deploy(client, project, image_ref=app_image("v1"), host_port=port, healthcheck=HEALTH)
    assert (await wait_for_status(client, first["id"], {"succeeded", "failed"}))["status"] == "succeeded"

    failing = {**HEALTH, "retries": 5}
    second = await deploy(
        client,
        project,
        image_ref=app_image("v2"),
        host_port=port,
        healthcheck=failing,
        environment={"HEALTH_FAIL": "1"},
    )
    done = await wait_for_status(client, second["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert "health" in done["error"].lower()

    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    assert response.text.strip() == "v1"

    names = sorted(c["Names"][0].lstrip("/") for c in [c._container for c in await containers_of(docker, project["name"])])
    assert names == [f"{project['name']}-v1-1"]
    first_now = (await client.get(f"/api/jarvis/deployments/{first['id']}")).json()
    assert first_now["status"] == "succeeded"


async def test_redeploy_supersedes_previous(client, project, docker):
    port = free_port()
    first = await deploy(client, project, image_ref=app_image("v1"), host_port=port, healthcheck=HEALTH)
    await wait_for_status(client, first["id"], {"succeeded"})

    second = await deploy(client, project, image_ref=app_image("v2"), host_port=port, healthcheck=HEALTH)
    assert second["version"] == 2
    assert (await wait_for_status(client, second["id"], {"succeeded", "failed"}))["status"] == "succeeded"

    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    assert response.text.strip() == "v2"
    assert (await client.get(f"/api/jarvis/deployments/{first['id']}")).json()["status"] == "superseded"
    # The old container goes right after the deployment is recorded as succeeded.
    await wait_for_event(client, second["id"], "removed_old")
    assert len(await containers_of(docker, project["name"])) == 1

    listing = await client.get("/api/jarvis/deployments", params={"project_id": project["id"], "limit": 1})
    page = listing.json()
    assert [item["version"] for item in page["items"]] == [2]
    assert page["next_cursor"]
    rest = await client.get(
        "/api/jarvis/deployments", params={"project_id": project["id"], "limit": 1, "cursor": page["next_cursor"]}
    )
    assert [item["version"] for item in rest.json()["items"]] == [1]
    assert rest.json()["next_cursor"] is None


async def test_recreate_rejects_taken_host_port_before_stopping(client, project, docker):
    import socket

    port = free_port()
    first = await deploy(client, project, image_ref=app_image("v1"), host_port=port, healthcheck=HEALTH)
    await wait_for_status(client, first["id"], {"succeeded"})

    other_port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", other_port))
        holder.listen()
        second = await deploy(client, project, image_ref=app_image("v2"), host_port=other_port, healthcheck=HEALTH)
        done = await wait_for_status(client, second["id"], {"succeeded", "failed"})

    assert done["status"] == "failed"
    assert f"host port {other_port} is already in use" in done["error"]
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    assert response.text.strip() == "v1"
    assert [event["stage"] for event in done["events"]].count("stopped_old") == 0
