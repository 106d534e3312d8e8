"""Fixtures for tests against real components: a fresh migrated database, Redis, a worker process, Docker."""

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import asyncpg
import httpx
import pytest

from jarvis_deploy.config import Settings
from tests.caddy import CaddyProcess, start_caddy

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SERVER = os.environ.get("JARVIS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# TODO: the sorted sets of the tests' private queues (`jarvis-test-<kind>-<hex>`) stay in this Redis
# after a run. arq's job keys expire on their own within a day; the queue keys do not.
REDIS_URL = os.environ.get("JARVIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REGISTRY = os.environ.get("JARVIS_TEST_REGISTRY", "localhost:5000")
TEST_LABEL = "dev.jarvis-deploy.test"


def app_image(tag: str) -> str:
    return f"{REGISTRY}/jarvis-testapp:{tag}"


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def database_url(run_id: str) -> Iterator[str]:
    """A database of its own for this test run, migrated with the CLI, dropped at the end."""
    name = f"jarvis_test_{run_id}"
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    env = {**os.environ, "JARVIS_DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "jarvis_deploy.cli", "migrate"], check=True, env=env, cwd=ROOT)
    yield url
    asyncio.run(_drop_database(name))


async def _drop_database(name: str) -> None:
    """Remove the Docker objects of every project of the run (the last safety net), then the database."""
    projects = await asyncpg.connect(POSTGRES_SERVER.rsplit("/", 1)[0] + f"/{name}")
    try:
        names = [row["name"] for row in await projects.fetch("SELECT name FROM projects")]
    finally:
        await projects.close()
    docker = aiodocker.Docker()
    try:
        for project in names:
            await remove_project_objects(docker, project)
    finally:
        await docker.close()

    connection = await asyncpg.connect(POSTGRES_SERVER)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def caddy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaddyProcess]:
    """A private Caddy with its admin API and one HTTP server on free loopback ports."""
    process = start_caddy(tmp_path_factory.mktemp("caddy"))
    yield process
    process.stop()


@dataclass
class ResolverProcess:
    address: str
    process: subprocess.Popen


@pytest.fixture(scope="session")
def upstream_resolver(resolver_process: ResolverProcess) -> str:
    """Address of the test run's `jarvis-deploy resolver`."""
    return resolver_process.address


@pytest.fixture(scope="session")
def resolver_process(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResolverProcess]:
    """A `jarvis-deploy resolver` process for the test database on a free UDP port."""
    address = f"127.0.0.1:{free_udp_port()}"
    log_path = tmp_path_factory.mktemp("resolver") / "resolver.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "resolver"],
            env={**os.environ, "JARVIS_DATABASE_URL": database_url, "JARVIS_UPSTREAM_RESOLVER": address},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_resolver(address, process, log_path)
        yield ResolverProcess(address, process)
    finally:
        stop_process(process)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_resolver(address: str, process: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
    """Return once the resolver responds to a lookup, which shows that it listens."""
    from jarvis_deploy.proxy.lookup import (
        ResolverUnavailable,
        lookup_name,
        query_addresses,
    )

    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(query_addresses(address, lookup_name("resolver-ready", 80, "ready"), timeout=0.5))
            return
        except ResolverUnavailable:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"resolver did not start:\n{log_path.read_text(errors='replace')[-5000:]}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def service_env(
    run_id: str,
    database_url: str,
    caddy: CaddyProcess,
    upstream_resolver: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """Environment of the service under test: its own database, queue, proxy network, Caddy and upstream resolver."""
    return {
        "JARVIS_CADDY_ADMIN_URL": caddy.admin_url,
        "JARVIS_CADDY_SERVER": caddy.server_name,
        "JARVIS_UPSTREAM_MODE": "loopback",
        "JARVIS_UPSTREAM_RESOLVER": upstream_resolver,
        "JARVIS_DRAIN_SECONDS": "0.5",
        "JARVIS_WATCH_SECONDS": "6",
        "JARVIS_DATABASE_URL": database_url,
        "JARVIS_REDIS_URL": REDIS_URL,
        "JARVIS_QUEUE_NAME": f"jarvis-test-{run_id}",
        "JARVIS_PROXY_NETWORK": f"jarvis-test-proxy-{run_id}",
        "JARVIS_PUBLISH_HOST_IP": "127.0.0.1",
        "JARVIS_STOP_TIMEOUT": "2",
        "JARVIS_LOG_LEVEL": "DEBUG",
        "JARVIS_ALLOWED_BIND_ROOTS": json.dumps([str(tmp_path_factory.getbasetemp())]),
        "JARVIS_SECRET_KEY": base64.urlsafe_b64encode(hashlib.sha256(run_id.encode()).digest()).decode(),
    }


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return Settings(**{key.removeprefix("JARVIS_").lower(): value for key, value in service_env.items()})


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture
async def context(settings: Settings) -> AsyncIterator:
    """The worker's shared clients, built in the test process, without a Caddy client."""
    from jarvis_deploy.deployments.runner import WorkerContext

    worker_context = WorkerContext.create(settings, with_caddy=False)
    yield worker_context
    await worker_context.close()


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """Send SIGTERM and wait `timeout` seconds, then SIGKILL; a process that already ended is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `jarvis-deploy worker` with `env` on top of this process's environment; returns once it reports started.

    The log is appended to, so one file can hold the lines of several workers in turn.
    """
    started_before = _started_lines(log_path)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "worker"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while _started_lines(log_path) <= started_before:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"worker did not start:\n{log_path.read_text(errors='replace')[-5000:]}")
        time.sleep(0.1)
    return process


def _started_lines(log_path: Path) -> int:
    return log_path.read_bytes().count(b"worker.started") if log_path.exists() else 0


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], worker_log: Path) -> Iterator[subprocess.Popen]:
    """A real arq worker process running `jarvis-deploy worker`."""
    process = start_worker(service_env, worker_log)
    yield process
    stop_process(process)


def create_token(service_env: dict[str, str], name: str, scopes: list[str], projects: list[str] = ()) -> str:
    """Create an API token with the CLI, as an operator on the host would."""
    command = [sys.executable, "-m", "jarvis_deploy.cli", "token", "create", "--name", name]
    command += [argument for scope in scopes for argument in ("--scope", scope)]
    command += [argument for project in projects for argument in ("--project", project)]
    result = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, **service_env}, cwd=ROOT
    )
    return result.stdout.strip()


@pytest.fixture(scope="session")
def admin_token(service_env: dict[str, str]) -> str:
    return create_token(service_env, "test-admin", ["admin"])


@pytest.fixture(scope="session")
async def api(settings: Settings) -> AsyncIterator:
    """The API application in process, with its lifespan running."""
    from jarvis_deploy.api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


def api_client(app, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://jarvis.test", headers=headers)


@pytest.fixture(scope="session")
async def client(api, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the in-process API that sends an admin token."""
    async with api_client(api, admin_token) as http:
        yield http


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    yield client
    await client.close()


@pytest.fixture(scope="session", autouse=False)
async def proxy_network_cleanup(docker: aiodocker.Docker, settings: Settings) -> AsyncIterator[None]:
    yield
    try:
        network = await docker.networks.get(settings.proxy_network)
        await network.delete()
    except aiodocker.DockerError:
        pass


async def remove_project_objects(docker: aiodocker.Docker, project: str) -> None:
    """Remove every container, network and volume the service created for a project."""
    label_filter = {"label": [f"dev.jarvis-deploy.project={project}"]}
    for container in await docker.containers.list(all=True, filters=label_filter):
        try:
            await container.delete(force=True)
        except aiodocker.DockerError as error:
            # The worker may remove a retired container at the same moment.
            if error.status not in (404, 409):
                raise
    for network in await docker.networks.list(filters=label_filter):
        try:
            await (await docker.networks.get(network["Id"])).delete()
        except aiodocker.DockerError:
            pass
    volumes = await docker.volumes.list(filters=label_filter)
    for volume in volumes.get("Volumes") or []:
        try:
            await (await docker.volumes.get(volume["Name"])).delete()
        except aiodocker.DockerError:
            pass


@pytest.fixture
async def project(
    client: httpx.AsyncClient, docker: aiodocker.Docker, proxy_network_cleanup: None
) -> AsyncIterator[dict]:
    """A project with a random name; everything Docker holds for it is removed afterwards."""
    name = f"t{secrets.token_hex(5)}"
    response = await client.post("/api/jarvis/projects", json={"name": name})
    assert response.status_code == 201, response.text
    yield response.json()
    await settle_project(client, response.json()["id"])
    await remove_project_objects(docker, name)


async def settle_project(client: httpx.AsyncClient, project_id: str, timeout: float = 120) -> None:
    """Cancel the project's queued deployments and wait for running ones to end, so no worker creates
    Docker objects after the test removed them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.get(f"/api/jarvis/projects/{project_id}/deployments", params={"limit": 500})
        items = response.json().get("items", [])
        for item in items:
            if item["status"] == "queued":
                await client.post(f"/api/jarvis/deployments/{item['id']}/cancel")
        if not any(item["status"] in ("queued", "in_progress") for item in items):
            return
        await asyncio.sleep(0.2)


async def wait_for_status(
    client: httpx.AsyncClient, deployment_id: str, statuses: set[str], timeout: float = 90
) -> dict:
    """Poll a deployment until it reaches one of `statuses`; fail with its events otherwise."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/api/jarvis/deployments/{deployment_id}")
        body = response.json()
        if body.get("status") in statuses:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"deployment {deployment_id} did not reach {statuses}; last state: {body}")


async def wait_for_event(client: httpx.AsyncClient, deployment_id: str, stage: str, timeout: float = 30) -> dict:
    """Poll a deployment until its timeline has an event of `stage` (steps after `succeeded`, say)."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = (await client.get(f"/api/jarvis/deployments/{deployment_id}")).json()
        if any(event["stage"] == stage for event in body.get("events", [])):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"deployment {deployment_id} has no {stage!r} event; last state: {body}")


@contextlib.contextmanager
def api_process(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run `jarvis-deploy api` on a free loopback port with `env`; yields its base URL once /healthz answers."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jarvis_deploy.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"API exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API did not respond within 30 s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        yield url
    finally:
        stop_process(process, timeout=15)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
