"""History, rollback to the exact image by digest, cancel, and waiting for the outcome."""

import secrets
import subprocess

import httpx
import pytest

from tests.conftest import REGISTRY, api_client, app_image, free_port, wait_for_status
from tests.integration.test_deploy_flow import HEALTH

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]


def tag_and_push(source: str, target: str) -> None:
    subprocess.run(["docker", "tag", source, target], check=True, capture_output=True)
    subprocess.run(["docker", "push", target], check=True, capture_output=True)


@pytest.fixture
def moving_tag():
    """An image tag in the test registry that the test moves from v1 to v2."""
    image = f"{REGISTRY}/jarvis-testapp:moving-{secrets.token_hex(4)}"
    yield image
    subprocess.run(["docker", "rmi", image], capture_output=True)


async def served_version(port: int) -> str:
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")).text.strip()


async def test_rollback_runs_the_same_digest_after_tag_moved(client, project, moving_tag):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": moving_tag, "port": 8080, "host_port": port, "healthcheck": HEALTH}

    tag_and_push(app_image("v1"), moving_tag)
    first = await client.post("/api/jarvis/deployments/deploy", params={"wait": 120}, json=body)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "succeeded"
    assert first.json()["image_digest"].startswith(f"{REGISTRY}/jarvis-testapp@sha256:")
    assert await served_version(port) == "v1"

    tag_and_push(app_image("v2"), moving_tag)
    second = await client.post("/api/jarvis/deployments/deploy", params={"wait": 120}, json=body)
    assert second.json()["status"] == "succeeded"
    assert second.json()["image_digest"] != first.json()["image_digest"]
    assert await served_version(port) == "v2"

    accepted = await client.post(f"/api/jarvis/deployments/{first.json()['id']}/rollback")
    assert accepted.status_code == 202, accepted.text
    rollback = accepted.json()
    assert rollback["version"] == 3
    assert rollback["rollback_of"] == first.json()["id"]
    assert rollback["image_ref"] == first.json()["image_digest"]

    done = await wait_for_status(client, rollback["id"], {"succeeded", "failed", "rolled_back"})
    assert done["status"] == "succeeded", done
    assert done["image_digest"] == first.json()["image_digest"]
    assert await served_version(port) == "v1"

    history = await client.get(f"/api/jarvis/projects/{project['id']}/deployments")
    assert [item["version"] for item in history.json()["items"]] == [3, 2, 1]
    assert {item["requested_by"] for item in history.json()["items"]} == {"test-admin"}
    live = await client.get(f"/api/jarvis/projects/{project['id']}/deployments", params={"status": "succeeded"})
    assert [item["version"] for item in live.json()["items"]] == [3]


async def test_rollback_without_digest_conflicts(client, project):
    missing = f"{REGISTRY}/jarvis-testapp:missing-{secrets.token_hex(4)}"
    body = {"project_id": project["id"], "image_ref": missing, "port": 8080, "host_port": free_port()}

    failed = await client.post("/api/jarvis/deployments/deploy", params={"wait": 60}, json=body)
    rollback = await client.post(f"/api/jarvis/deployments/{failed.json()['id']}/rollback")

    assert failed.json()["status"] == "failed"
    assert rollback.status_code == 409


async def test_cancel_only_while_queued(settings, admin_token, client, project):
    from jarvis_deploy.api.app import create_app

    # An API on a queue that no worker reads keeps its deployment queued.
    app = create_app(settings.model_copy(update={"queue_name": f"jarvis-test-idle-{secrets.token_hex(4)}"}))
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": free_port()}
    async with app.router.lifespan_context(app), api_client(app, admin_token) as idle:
        queued = (await idle.post("/api/jarvis/deployments/deploy", json=body)).json()
        cancelled = await idle.post(f"/api/jarvis/deployments/{queued['id']}/cancel")
        again = await idle.post(f"/api/jarvis/deployments/{queued['id']}/cancel")

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert again.status_code == 200

    ran = await client.post("/api/jarvis/deployments/deploy", params={"wait": 60}, json={**body, "healthcheck": HEALTH})
    late = await client.post(f"/api/jarvis/deployments/{ran.json()['id']}/cancel")
    assert ran.json()["status"] == "succeeded"
    assert late.status_code == 409
