"""Workers that die or shut down mid-deployment: SIGKILL at each blue-green step, and SIGTERM.

The worker under test keeps the deployment still right after the step's event (JARVIS_PAUSE_AFTER_STAGES),
so the kill lands at that step every time. The new worker's start-up recovery must fail the
deployment, route the domain to the previous version, and leave no container of the killed run.
"""

import asyncio
import json
import secrets
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from jarvis_deploy.api.app import create_app
from jarvis_deploy.config import Settings
from jarvis_deploy.proxy.caddy import route_id
from tests.caddy import route_upstreams
from tests.conftest import (
    api_client,
    app_image,
    free_port,
    start_worker,
    stop_process,
    wait_for_event,
    wait_for_status,
)
from tests.integration.test_deploy_flow import containers_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 50}
# The service's lowest accepted heartbeat timeout; a killed worker's deployment counts as abandoned after it.
HEARTBEAT_TIMEOUT = 10
# (stage the worker is killed after, what the killed run had done by then)
STEPS = [
    ("image", "pulled the image"),
    ("started", "started the new container"),
    ("healthy", "seen the new container healthy"),
    ("switched", "switched the route to the new container"),
    ("draining", "begun draining the old container"),
    ("watching", "stopped the old container and begun the watch window"),
]


@pytest.fixture
async def private_setup(service_env, settings: Settings, admin_token, tmp_path: Path):
    """An API and a queue of their own, so the test can kill and replace the worker that serves them."""
    queue = f"jarvis-test-crash-{secrets.token_hex(4)}"
    env = {**service_env, "JARVIS_QUEUE_NAME": queue, "JARVIS_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT)}
    workers: list[subprocess.Popen] = []
    app = create_app(settings.model_copy(update={"queue_name": queue}))
    async with app.router.lifespan_context(app), api_client(app, admin_token) as client:
        yield client, env, tmp_path / "worker.log", workers
    for process in workers:
        stop_process(process)


async def served_version(caddy, host: str) -> str:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        response = await http.get(f"http://127.0.0.1:{caddy.http_port}/cgi-bin/version", headers={"Host": host})
    return response.text.strip() if response.status_code == 200 else f"HTTP {response.status_code}"


async def serve_v1(client, project, caddy, private_setup) -> tuple[str, dict, dict]:
    """Deploy v1 blue-green with a worker that then stops; returns the domain, the request body and the deployment."""
    private_client, env, log_path, workers = private_setup
    host = f"{project['name']}.crash.test"
    body = {
        "project_id": project["id"],
        "image_ref": app_image("v1"),
        "port": 8080,
        "domain": host,
        "strategy": "blue-green",
        "healthcheck": HEALTH,
    }
    workers.append(start_worker(env, log_path))
    first = (await private_client.post("/api/jarvis/deployments/deploy", json=body)).json()
    done = await wait_for_status(client, first["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert await served_version(caddy, host) == "v1"
    stop_process(workers[0])
    return host, body, first


async def wait_heartbeat_expired(killed_at: float) -> None:
    await asyncio.sleep(max(0.0, killed_at + HEARTBEAT_TIMEOUT + 1 - time.monotonic()))


@pytest.mark.parametrize(("stage", "done_by_then"), STEPS, ids=[stage for stage, _ in STEPS])
async def test_worker_killed_at_step_is_recovered(
    stage, done_by_then, client, project, docker, caddy, private_setup
):
    private_client, env, log_path, workers = private_setup
    host, body, first = await serve_v1(client, project, caddy, private_setup)

    # A worker that pauses after `stage` takes the next deployment and is killed there.
    workers.append(start_worker({**env, "JARVIS_PAUSE_AFTER_STAGES": json.dumps([stage])}, log_path))
    second = (await private_client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v2")})).json()
    await wait_for_event(client, second["id"], stage, timeout=60)
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait(timeout=10)
    killed_at = time.monotonic()
    assert (await client.get(f"/api/jarvis/deployments/{second['id']}")).json()["status"] == "in_progress"

    await wait_heartbeat_expired(killed_at)
    workers.append(start_worker(env, log_path))

    done = await wait_for_status(client, second["id"], {"failed", "succeeded", "rolled_back"}, timeout=60)
    assert done["status"] == "failed", f"killed after it had {done_by_then}: {done}"
    assert "worker" in done["error"]
    assert await served_version(caddy, host) == "v1"
    route = await caddy_route_upstreams(caddy, project["name"])
    remaining = [container._container for container in await containers_of(docker, project["name"])]
    assert [item["Labels"]["dev.jarvis-deploy.deployment"] for item in remaining] == [first["id"]], remaining
    assert [item["State"] for item in remaining] == ["running"]
    published = {f"{port['IP']}:{port['PublicPort']}" for item in remaining for port in item["Ports"] if port.get("PublicPort")}
    assert route == sorted(published)

    # The project deploys normally afterwards.
    third = (await private_client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v2")})).json()
    assert (await wait_for_status(client, third["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert await served_version(caddy, host) == "v2"


async def caddy_route_upstreams(caddy, project: str) -> list[str]:
    """The dial addresses that the project's route in Caddy's running configuration sends requests to."""
    return await route_upstreams(caddy.admin_url, route_id(project)) or []


async def wait_exit(process: subprocess.Popen, timeout: float) -> int:
    """Wait for a worker process to exit; fail when it is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, f"worker {process.pid} still running {timeout}s after SIGTERM"
        await asyncio.sleep(0.1)
    return process.returncode


@pytest.mark.parametrize(
    ("stage", "signals"), [("healthy", 1), ("watching", 2)], ids=["one-sigterm", "second-sigterm-during-clean-up"]
)
async def test_sigterm_hands_back_an_unfinished_deployment(
    stage, signals, client, project, docker, caddy, private_setup
):
    private_client, env, log_path, workers = private_setup
    host, body, first = await serve_v1(client, project, caddy, private_setup)

    # This worker pauses the deployment after `stage` for longer than its grace period.
    paused = {**env, "JARVIS_PAUSE_AFTER_STAGES": json.dumps([stage]), "JARVIS_SHUTDOWN_GRACE_SECONDS": "1"}
    workers.append(start_worker(paused, log_path))
    second = (await private_client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v2")})).json()
    await wait_for_event(client, second["id"], stage, timeout=60)
    workers[1].send_signal(signal.SIGTERM)
    if signals == 2:
        # arq cancels again 1 s after this signal, while the hand-back (after `watching` it starts the
        # stopped v1 container and waits for its health check) is still running.
        await asyncio.sleep(0.3)
        workers[1].send_signal(signal.SIGTERM)
    await wait_exit(workers[1], 60)

    handed_back = (await client.get(f"/api/jarvis/deployments/{second['id']}")).json()
    assert handed_back["status"] == "queued", handed_back
    assert "handed_back" in [event["stage"] for event in handed_back["events"]]
    remaining = [container._container for container in await containers_of(docker, project["name"])]
    assert [item["Labels"]["dev.jarvis-deploy.deployment"] for item in remaining] == [first["id"]], remaining
    assert await served_version(caddy, host) == "v1"

    # Another worker runs the handed-back deployment from the start.
    workers.append(start_worker(env, log_path))
    done = await wait_for_status(client, second["id"], {"succeeded", "failed"}, timeout=90)
    assert done["status"] == "succeeded", done
    assert await served_version(caddy, host) == "v2"


async def test_sigterm_finishes_running_deployment(client, project, docker, private_setup):
    private_client, env, log_path, workers = private_setup
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    workers.append(start_worker({**env, "JARVIS_SHUTDOWN_GRACE_SECONDS": "60"}, log_path))

    # The app takes two seconds to listen, so the deployment is still running when SIGTERM arrives.
    slow = (await private_client.post("/api/jarvis/deployments/deploy", json={**body, "environment": {"START_DELAY": "2"}})).json()
    await wait_for_event(client, slow["id"], "started", timeout=60)
    workers[0].send_signal(signal.SIGTERM)
    later = (await private_client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v2")})).json()
    await wait_exit(workers[0], 90)

    assert (await client.get(f"/api/jarvis/deployments/{slow['id']}")).json()["status"] == "succeeded"
    assert (await client.get(f"/api/jarvis/deployments/{later['id']}")).json()["status"] == "queued"
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")).text.strip() == "v1"


async def test_time_limit_fails_and_cleans_up(client, project, docker, caddy, private_setup):
    private_client, env, log_path, workers = private_setup
    host, body, first = await serve_v1(client, project, caddy, private_setup)
    workers.append(start_worker({**env, "JARVIS_JOB_TIMEOUT": "10"}, log_path))

    # v2 never listens, and its health check would go on for far longer than the time limit.
    slow = {**body, "image_ref": app_image("v2"), "environment": {"START_DELAY": "600"}, "healthcheck": {**HEALTH, "retries": 10000}}
    second = (await private_client.post("/api/jarvis/deployments/deploy", json=slow)).json()
    done = await wait_for_status(client, second["id"], {"failed", "succeeded", "rolled_back"}, timeout=90)

    assert done["status"] == "failed", done
    assert "time limit of 10s" in done["error"]
    assert await served_version(caddy, host) == "v1"
    remaining = [container._container for container in await containers_of(docker, project["name"])]
    assert [item["Labels"]["dev.jarvis-deploy.deployment"] for item in remaining] == [first["id"]], remaining
    assert workers[-1].poll() is None
