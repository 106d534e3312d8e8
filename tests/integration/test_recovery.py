"""Crash recovery: a killed worker's deployment is failed and cleaned up; orphans are removed."""

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time

import aiodocker
import httpx
import pytest

from jarvis_deploy.deployments import recovery
from tests.conftest import ROOT, api_client, app_image, free_port, wait_for_status
from tests.integration.test_deploy_flow import HEALTH, containers_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]



@pytest.fixture
async def private_queue(service_env, settings, admin_token, tmp_path):
    """An API and a worker process on a queue of their own, so the test can kill that worker."""
    from jarvis_deploy.api.app import create_app

    queue = f"jarvis-test-private-{secrets.token_hex(4)}"
    env = {**os.environ, **service_env, "JARVIS_QUEUE_NAME": queue}
    log = tmp_path / "private-worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "worker"], env=env, cwd=ROOT, stdout=output, stderr=output
        )
    deadline = time.monotonic() + 30
    while b"worker.started" not in log.read_bytes():
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
        await asyncio.sleep(0.1)

    app = create_app(settings.model_copy(update={"queue_name": queue}))
    async with app.router.lifespan_context(app), api_client(app, admin_token) as client:
        yield client, worker
    if worker.poll() is None:
        worker.kill()
    worker.wait(timeout=10)


async def test_killed_worker_deployment_recovered(client, project, docker, context, private_queue):
    private_client, private_worker = private_queue
    port = free_port()
    first = await client.post(
        "/api/jarvis/deployments/deploy",
        json={"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH},
    )
    await wait_for_status(client, first.json()["id"], {"succeeded"})

    # v2 never becomes healthy, so the private worker is still waiting when it is killed.
    body = {
        "project_id": project["id"],
        "image_ref": app_image("v2"),
        "port": 8080,
        "host_port": port,
        "environment": {"START_DELAY": "600"},
        "healthcheck": {**HEALTH, "retries": 10000},
    }
    stuck = (await private_client.post("/api/jarvis/deployments/deploy", json=body)).json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [c._container["Names"][0] for c in await containers_of(docker, project["name"])]
        if f"/{project['name']}-v2-1" in names:
            break
        await asyncio.sleep(0.2)
    # A live worker holds the project lock, so its deployment is never taken over, however old its heartbeat.
    assert await recovery.recover_abandoned(context, heartbeat_timeout=0) == 0

    private_worker.send_signal(signal.SIGKILL)
    private_worker.wait(timeout=10)
    assert (await client.get(f"/api/jarvis/deployments/{stuck['id']}")).json()["status"] == "in_progress"

    # The session's own worker may run the same recovery on its schedule first; either way it runs once.
    recovered = await recovery.recover_abandoned(context, heartbeat_timeout=0)
    assert recovered <= 1

    after = (await client.get(f"/api/jarvis/deployments/{stuck['id']}")).json()
    assert after["status"] == "failed"
    assert "heartbeat" in after["error"]
    remaining = [c._container for c in await containers_of(docker, project["name"])]
    assert [c["Labels"]["dev.jarvis-deploy.deployment"] for c in remaining] == [first.json()["id"]]
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{port}/cgi-bin/version")
    assert response.text.strip() == "v1"


async def test_orphans_removed_foreign_untouched(docker: aiodocker.Docker, context, settings, project):
    suffix = secrets.token_hex(4)
    image = app_image("v1")
    orphan_labels = {
        "dev.jarvis-deploy.managed": "true",
        "dev.jarvis-deploy.project": project["name"],
        "dev.jarvis-deploy.deployment": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
        "dev.jarvis-deploy.instance": settings.instance_id,
    }
    other_instance = {**orphan_labels, "dev.jarvis-deploy.instance": "another-instance"}
    foreign = {"dev.jarvis-deploy.test": suffix}
    created = []
    try:
        for name, labels in (("orphan", orphan_labels), ("other", other_instance), ("foreign", foreign)):
            container = await docker.containers.create(
                {"Image": image, "Labels": labels}, name=f"jarvis-test-{name}-{suffix}"
            )
            created.append(container)

        removed = await recovery.remove_orphans(context)

        assert removed >= 1
        names = {item["Names"][0].lstrip("/") for item in [c._container for c in await docker.containers.list(all=True)]}
        assert f"jarvis-test-orphan-{suffix}" not in names
        assert f"jarvis-test-other-{suffix}" in names
        assert f"jarvis-test-foreign-{suffix}" in names
    finally:
        for container in created:
            try:
                await container.delete(force=True)
            except aiodocker.DockerError:
                pass


async def test_lost_queue_entries_are_requeued(service_env, settings, admin_token, client, project, tmp_path):
    """Deleting the queue's Redis keys, as a Redis restart without persistence does, loses no deployment."""
    from arq.connections import ArqRedis

    from jarvis_deploy import queue as job_queue
    from jarvis_deploy.api.app import create_app

    queue_name = f"jarvis-test-flush-{secrets.token_hex(4)}"
    app = create_app(settings.model_copy(update={"queue_name": queue_name}))
    body = {
        "project_id": project["id"],
        "image_ref": app_image("v1"),
        "port": 8080,
        "host_port": free_port(),
        "healthcheck": HEALTH,
    }
    async with app.router.lifespan_context(app), api_client(app, admin_token) as idle:
        queued = (await idle.post("/api/jarvis/deployments/deploy", json=body)).json()

    redis = ArqRedis.from_url(settings.redis_url)
    try:
        job_key = f"arq:job:{job_queue.job_id(job_queue.RUN_DEPLOYMENT, queued['id'])}"
        assert await redis.exists(job_key)
        await redis.delete(job_key, queue_name)
    finally:
        await redis.aclose()

    env = {**os.environ, **service_env, "JARVIS_QUEUE_NAME": queue_name}
    log = tmp_path / "flush-worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "worker"], env=env, cwd=ROOT, stdout=output, stderr=output
        )
    try:
        done = await wait_for_status(client, queued["id"], {"succeeded", "failed"})
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    assert done["status"] == "succeeded", done
    assert "requeued" in log.read_text(errors="replace")


async def test_repeated_deploy_never_shares_volume(client, project, docker):
    """Two identical recreate deploys in quick succession never run two containers on one named volume."""
    body = {
        "project_id": project["id"],
        "image_ref": app_image("v1"),
        "port": 8080,
        "host_port": free_port(),
        "volumes": [{"source": "data", "target": "/data"}],
        "healthcheck": HEALTH,
    }
    first = (await client.post("/api/jarvis/deployments/deploy", json=body)).json()
    second = (await client.post("/api/jarvis/deployments/deploy", json=body)).json()

    most_running = 0
    while True:
        running = await docker.containers.list(
            filters={"label": [f"dev.jarvis-deploy.project={project['name']}"], "volume": [f"{project['name']}_data"]}
        )
        most_running = max(most_running, len(running))
        states = [(await client.get(f"/api/jarvis/deployments/{item['id']}")).json()["status"] for item in (first, second)]
        if all(state not in ("queued", "in_progress") for state in states):
            break
        await asyncio.sleep(0.02)

    # Read again: the first state above may predate the second deployment's success.
    states = [(await client.get(f"/api/jarvis/deployments/{item['id']}")).json()["status"] for item in (first, second)]
    assert states == ["superseded", "succeeded"]
    assert most_running == 1


async def test_orphan_networks_and_volumes_removed(docker: aiodocker.Docker, context, settings, client, project):
    """Networks of projects with nothing live go, volumes only with their project; other objects stay."""
    suffix = secrets.token_hex(4)
    mine = {"dev.jarvis-deploy.managed": "true", "dev.jarvis-deploy.instance": settings.instance_id}
    gone_project = {**mine, "dev.jarvis-deploy.project": f"gone{suffix}"}
    stopped_project = {**mine, "dev.jarvis-deploy.project": project["name"]}
    other_instance = {**gone_project, "dev.jarvis-deploy.instance": "another-instance"}
    foreign = {"dev.jarvis-deploy.test": suffix}
    networks = {
        "gone": gone_project,
        "stopped": stopped_project,
        "other": other_instance,
        "foreign": foreign,
    }
    volumes = {"gone": gone_project, "stopped": stopped_project, "other": other_instance, "foreign": foreign}
    try:
        for key, labels in networks.items():
            await docker.networks.create({"Name": f"jarvis-test-{key}-{suffix}", "Labels": labels})
        for key, labels in volumes.items():
            await docker.volumes.create({"Name": f"jarvis-test-{key}-{suffix}", "Labels": labels})

        removed = await recovery.remove_orphan_networks_and_volumes(context)

        assert removed >= 3
        network_names = {item["Name"] for item in await docker.networks.list()}
        volume_names = {item["Name"] for item in (await docker.volumes.list())["Volumes"]}
        # The project exists but has no live deployment: its network goes, its volume keeps the data.
        assert f"jarvis-test-gone-{suffix}" not in network_names
        assert f"jarvis-test-stopped-{suffix}" not in network_names
        assert f"jarvis-test-other-{suffix}" in network_names
        assert f"jarvis-test-foreign-{suffix}" in network_names
        assert f"jarvis-test-gone-{suffix}" not in volume_names
        assert f"jarvis-test-stopped-{suffix}" in volume_names
        assert f"jarvis-test-other-{suffix}" in volume_names
        assert f"jarvis-test-foreign-{suffix}" in volume_names
    finally:
        for key in networks:
            with contextlib.suppress(aiodocker.DockerError):
                await (await docker.networks.get(f"jarvis-test-{key}-{suffix}")).delete()
        for key in volumes:
            with contextlib.suppress(aiodocker.DockerError):
                await (await docker.volumes.get(f"jarvis-test-{key}-{suffix}")).delete()


async def test_network_of_live_project_kept(docker: aiodocker.Docker, context, client, project):
    port = free_port()
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, "host_port": port, "healthcheck": HEALTH}
    accepted = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert (await wait_for_status(client, accepted.json()["id"], {"succeeded", "failed"}))["status"] == "succeeded"

    await recovery.remove_orphan_networks_and_volumes(context)

    names = {item["Name"] for item in await docker.networks.list()}
    assert f"{project['name']}_default" in names

    stopped = await client.post(f"/api/jarvis/deployments/{accepted.json()['id']}/stop")
    assert stopped.status_code == 202
    await wait_for_status(client, accepted.json()["id"], {"stopped"})
    await recovery.remove_orphan_networks_and_volumes(context)

    names = {item["Name"] for item in await docker.networks.list()}
    assert f"{project['name']}_default" not in names
