"""DockerEngine and the health gate against the real Docker Engine and the loopback registry.

Every container, network and volume gets a random name and the label dev.jarvis-deploy.test=<run>,
and the fixtures remove them afterwards. Probes go only to 127.0.0.1 and to containers created here.
"""

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiodocker.exceptions import DockerStreamError

from jarvis_deploy import naming
from jarvis_deploy.deployments.schemas import HealthCheck
from jarvis_deploy.engine.docker import (
    DockerEngine,
    parse_docker_timestamp,
    parse_log_chunks,
)
from jarvis_deploy.engine.errors import (
    ContainerNameConflict,
    ContainerNotFound,
    HealthCheckFailed,
    ImagePullError,
)
from jarvis_deploy.engine.health import ProbeResult, wait_until_healthy
from jarvis_deploy.engine.translate import ContainerPlan, container_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKER_URL = os.environ.get("JARVIS_DOCKER_URL", "unix:///var/run/docker.sock")
REGISTRY = os.environ.get("JARVIS_TEST_REGISTRY", "localhost:5000")
TEST_LABEL = "dev.jarvis-deploy.test"
APP_PORT = 8080
FAST_HTTP = HealthCheck(type="http", path="/cgi-bin/health", interval=0.2, timeout=1, retries=50)


def image(tag: str) -> str:
    return f"{REGISTRY}/jarvis-testapp:{tag}"


@dataclass
class Sandbox:
    """Docker objects of one test, removed by the fixture that yields it."""

    engine: DockerEngine
    run: str
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, str]:
        return {TEST_LABEL: self.run}

    def project(self) -> str:
        return f"jt{secrets.token_hex(5)}"

    async def network(self, name: str) -> str:
        self.networks.append(name)
        return await self.engine.ensure_network(name, self.labels)

    async def start_app(
        self,
        tag: str = "v1",
        *,
        environment: dict[str, str] | None = None,
        publish: bool = True,
        restart: str = "no",
        extra_networks: int = 0,
        deployment: str = "d1",
    ) -> tuple[str, ContainerPlan, str]:
        """Create and start a test app container; return its id, plan and project name."""
        project = self.project()
        document = app_document(project, image(tag), environment or {}, publish, restart, extra_networks)
        plan = container_config(document, project, {**self.labels, naming.LABEL_DEPLOYMENT: deployment})
        for network in document["networks"].values():
            await self.network(network["name"])

        container_id = await self.engine.create_container(f"{project}-v1-1", plan)
        self.containers.append(container_id)
        await self.engine.connect_networks(container_id, plan)
        await self.engine.start(container_id)
        return container_id, plan, project


def app_document(
    project: str, image_ref: str, environment: dict[str, str], publish: bool, restart: str, extra_networks: int
) -> dict[str, Any]:
    """A document shaped like the stored one, passed through YAML with `$` escaped as `$$`."""
    networks = {"default": {"name": f"{project}_default"}}
    for number in range(extra_networks):
        networks[f"extra{number}"] = {"name": f"{project}_extra{number}"}
    service: dict[str, Any] = {
        "image": image_ref,
        "restart": restart,
        "environment": {key: value.replace("$", "$$") for key, value in environment.items()},
        "networks": {key: {} for key in networks},
        "logging": {"driver": "json-file", "options": {"max-size": "1m", "max-file": "1"}},
        "x-jarvis": {"port": APP_PORT, "replicas": 1, "strategy": "recreate", "healthcheck": None},
    }
    if publish:
        # Port 0 would not parse; an empty host port lets Docker choose a free one on loopback.
        service["ports"] = [f"127.0.0.1::{APP_PORT}"]
    document = {"services": {project: service}, "networks": networks}
    return yaml.safe_load(yaml.safe_dump(document))


@pytest.fixture(scope="session")
def built_images() -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "build-test-images.sh")],
        check=True,
        env={**os.environ, "JARVIS_TEST_REGISTRY": REGISTRY},
        stdout=subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
async def engine(built_images: None) -> AsyncIterator[DockerEngine]:
    docker_engine = DockerEngine(DOCKER_URL)
    await docker_engine.ping()
    for tag in ("v1", "healthcheck"):
        if not await docker_engine.image_present(image(tag)):
            await docker_engine.pull(image(tag))
    yield docker_engine
    await docker_engine.close()


@pytest.fixture
async def sandbox(engine: DockerEngine) -> AsyncIterator[Sandbox]:
    box = Sandbox(engine, secrets.token_hex(6))
    try:
        yield box
    finally:
        for container in await engine.list_containers(box.labels):
            await engine.remove(container.id)
        for container_id in box.containers:
            await engine.remove(container_id)
        docker = engine._docker
        for name in set(box.networks):
            networks = await docker.networks.list(filters={"name": [name], "label": [f"{TEST_LABEL}={box.run}"]})
            for network in networks:
                await (await docker.networks.get(network["Id"])).delete()
        for name in set(box.volumes):
            await (await docker.volumes.get(name)).delete()


async def published_address(engine: DockerEngine, container_id: str) -> str:
    info = await engine.inspect(container_id)
    binding = info["NetworkSettings"]["Ports"][f"{APP_PORT}/tcp"][0]
    return f"127.0.0.1:{binding['HostPort']}"


async def get(address: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        return await client.get(f"http://{address}{path}")


async def test_pull_fetches_removed_image(engine: DockerEngine) -> None:
    ref = image("pull")
    if await engine.image_present(ref):
        await engine._docker.images.delete(ref, force=True)
    assert not await engine.image_present(ref)

    image_id = await engine.pull(ref)

    assert image_id.startswith("sha256:")
    assert await engine.image_present(ref)
    inspected = await engine._docker.images.inspect(ref)
    assert inspected["Id"] == image_id


async def test_pull_missing_tag_raises_registry_message(engine: DockerEngine) -> None:
    ref = image(f"missing-{secrets.token_hex(4)}")

    with pytest.raises(ImagePullError) as caught:
        await engine.pull(ref)

    assert caught.value.image == ref
    assert "manifest unknown" in caught.value.message
    assert ref in caught.value.message


async def test_pull_missing_repository_raises(engine: DockerEngine) -> None:
    ref = f"{REGISTRY}/jarvis-missing-{secrets.token_hex(4)}:v1"

    with pytest.raises(ImagePullError) as caught:
        await engine.pull(ref)

    assert "unknown" in caught.value.message
    assert not await engine.image_present(ref)


async def test_container_lifecycle(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, plan, project = await sandbox.start_app(extra_networks=1)

    report = await wait_until_healthy(engine, container_id, APP_PORT, FAST_HTTP)

    address = await published_address(engine, container_id)
    assert report.address == address
    assert report.probes >= 1
    assert report.docker_health is None
    assert (await get(address, "/cgi-bin/version")).text == "v1\n"

    info = await engine.inspect(container_id)
    networks = info["NetworkSettings"]["Networks"]
    assert set(networks) == {f"{project}_default", f"{project}_extra0"}
    assert project in networks[f"{project}_default"]["Aliases"]
    assert project in networks[f"{project}_extra0"]["Aliases"]
    assert info["Config"]["Labels"][TEST_LABEL] == sandbox.run

    listed = await engine.list_containers(sandbox.labels, all=False)
    assert [(container.id, container.name, container.state) for container in listed] == [
        (container_id, f"{project}-v1-1", "running")
    ]

    await engine.stop(container_id, timeout=5)
    assert (await engine.inspect(container_id))["State"]["Status"] == "exited"
    assert await engine.list_containers(sandbox.labels, all=False) == []
    assert [container.state for container in await engine.list_containers(sandbox.labels)] == ["exited"]
    await engine.stop(container_id, timeout=5)

    await engine.remove(container_id)
    with pytest.raises(ContainerNotFound):
        await engine.inspect(container_id)
    await engine.remove(container_id)


async def test_logs_keep_streams_apart(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app()
    await wait_until_healthy(engine, container_id, APP_PORT, FAST_HTTP)

    entries = await engine.logs(container_id, tail=100)

    stdout = [entry.text for entry in entries if entry.stream == "stdout"]
    stderr = [entry.text for entry in entries if entry.stream == "stderr"]
    assert "testapp v1 listening on 8080" in stdout
    assert any(text.startswith("testapp v1 started with pid") for text in stderr)
    assert all(entry.timestamp.tzinfo is not None for entry in entries)
    assert [entry.timestamp for entry in entries] == sorted(entry.timestamp for entry in entries)
    assert not any(text.startswith("20") for text in stdout + stderr)

    await engine.stop(container_id, timeout=5)
    last = await engine.logs(container_id, tail=1)
    assert [(entry.stream, entry.text) for entry in last] == [("stdout", "testapp v1 stopping")]


async def test_create_container_reuses_same_deployment(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, plan, project = await sandbox.start_app(deployment="first")

    again = await engine.create_container(f"{project}-v1-1", plan)

    assert again == container_id


async def test_create_container_rejects_other_deployment(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, plan, project = await sandbox.start_app(deployment="first")
    other = ContainerPlan(
        body={**plan.body, "Labels": {**plan.body["Labels"], naming.LABEL_DEPLOYMENT: "second"}},
        networks=plan.networks,
    )

    with pytest.raises(ContainerNameConflict) as caught:
        await engine.create_container(f"{project}-v1-1", other)

    assert caught.value.existing_id == container_id
    assert "first" in caught.value.message


async def test_ensure_network_idempotent_under_race(sandbox: Sandbox) -> None:
    """Five engines simulate five worker processes, which share no lock."""
    name = f"jt{secrets.token_hex(5)}_race"
    sandbox.networks.append(name)
    engines = [DockerEngine(DOCKER_URL) for _ in range(5)]

    try:
        ids = await asyncio.gather(*(engine.ensure_network(name, sandbox.labels) for engine in engines))
    finally:
        for engine in engines:
            await engine.close()
    again = await sandbox.engine.ensure_network(name, sandbox.labels)

    assert len(set(ids)) == 1
    assert again == ids[0]
    matching = await sandbox.engine._docker.networks.list(filters={"name": [name]})
    assert [network["Id"] for network in matching if network["Name"] == name] == [again]


async def test_ensure_volume_idempotent(sandbox: Sandbox) -> None:
    name = f"jt{secrets.token_hex(5)}_data"
    sandbox.volumes.append(name)

    first = await sandbox.engine.ensure_volume(name, sandbox.labels)
    second = await sandbox.engine.ensure_volume(name, {**sandbox.labels, "other": "label"})

    assert first == second == name
    volume = await (await sandbox.engine._docker.volumes.get(name)).show()
    assert volume["Labels"] == sandbox.labels


async def test_slow_start_tcp_not_healthy_before_listening(sandbox: Sandbox) -> None:
    """docker-proxy accepts connections on the published port before the app listens; the probe must not count them."""
    engine = sandbox.engine
    probes: list[tuple[float, ProbeResult]] = []
    container_id, _, _ = await sandbox.start_app(environment={"START_DELAY": "3"})

    report = await wait_until_healthy(
        engine,
        container_id,
        APP_PORT,
        None,
        on_probe=lambda result: probes.append((time.time(), result)),
    )

    entries = await engine.logs(container_id, tail=100)
    listening = next(entry for entry in entries if entry.text == "testapp v1 listening on 8080")
    first_pass = next(wall_time for wall_time, result in probes if result.passed)
    assert first_pass >= listening.timestamp.timestamp()
    assert not probes[0][1].passed
    assert "closed right after connect" in (probes[0][1].error or "")
    assert report.duration >= 2.5


async def test_slow_start_http_probes_container_ip(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, plan, _ = await sandbox.start_app(environment={"START_DELAY": "3"}, publish=False)
    started = time.monotonic()

    report = await wait_until_healthy(engine, container_id, APP_PORT, FAST_HTTP)

    info = await engine.inspect(container_id)
    ip = info["NetworkSettings"]["Networks"][plan.primary_network]["IPAddress"]
    assert report.address == f"{ip}:{APP_PORT}"
    assert time.monotonic() - started >= 2.5
    assert report.probes > 1


async def test_health_fail_raises_reason(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(environment={"HEALTH_FAIL": "1"})
    check = HealthCheck(type="http", path="/cgi-bin/health", interval=0.2, timeout=1, retries=3)

    with pytest.raises(HealthCheckFailed) as caught:
        await wait_until_healthy(engine, container_id, APP_PORT, check)

    assert caught.value.probes == 3
    assert "returned status 500" in caught.value.reason
    assert "3 probes in a row failed" in caught.value.reason
    assert "listens on port 8080" in caught.value.reason
    assert caught.value.exit_code is None


async def test_health_fail_after_start_period(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(environment={"HEALTH_FAIL": "1"})
    check = HealthCheck(type="http", path="/cgi-bin/health", interval=0.2, timeout=1, retries=2, start_period=1.5)

    with pytest.raises(HealthCheckFailed) as caught:
        await wait_until_healthy(engine, container_id, APP_PORT, check)

    assert caught.value.elapsed >= 1.5
    assert caught.value.probes > 2


async def test_successes_need_consecutive_passes(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app()
    check = FAST_HTTP.model_copy(update={"successes": 3})
    results: list[ProbeResult] = []

    async def record(result: ProbeResult) -> None:
        results.append(result)

    report = await wait_until_healthy(engine, container_id, APP_PORT, check, on_probe=record)

    assert [result.passed for result in results[-3:]] == [True, True, True]
    assert report.probes == len(results)


async def test_fail_after_breaks_passing_streak(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(environment={"FAIL_AFTER": "2"})
    check = HealthCheck(type="http", path="/cgi-bin/health", interval=0.2, timeout=1, retries=3, successes=100)
    results: list[ProbeResult] = []

    with pytest.raises(HealthCheckFailed) as caught:
        await wait_until_healthy(engine, container_id, APP_PORT, check, on_probe=results.append)

    assert sum(result.passed for result in results) >= 3
    assert [result.passed for result in results[-3:]] == [False, False, False]
    assert "returned status 500" in caught.value.reason
    assert caught.value.elapsed >= 2


@pytest.mark.parametrize("restart", ["no", "unless-stopped"])
async def test_crash_fails_at_once_with_exit_code(sandbox: Sandbox, restart: str) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(
        environment={"CRASH_AFTER": "1", "CRASH_CODE": "7", "HEALTH_FAIL": "1"}, restart=restart
    )
    check = HealthCheck(type="http", path="/cgi-bin/health", interval=0.2, timeout=1, retries=1000)

    with pytest.raises(HealthCheckFailed) as caught:
        await wait_until_healthy(engine, container_id, APP_PORT, check)

    assert caught.value.exit_code == 7
    assert "exit code 7" in caught.value.reason
    assert "testapp v1 crashing with exit code 7" in caught.value.reason
    assert any(entry.text == "testapp v1 crashing with exit code 7" for entry in caught.value.logs)
    assert len(caught.value.logs) <= 10
    assert caught.value.elapsed < 10


async def test_exit_codes_survive_restart(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(
        environment={"CRASH_AFTER": "0.5", "CRASH_CODE": "9"}, restart="unless-stopped"
    )
    info = await engine.inspect(container_id)
    deadline = time.monotonic() + 20
    while info["RestartCount"] < 1 or info["State"]["Restarting"]:
        assert time.monotonic() < deadline, "container was not restarted within 20 seconds"
        await asyncio.sleep(0.2)
        info = await engine.inspect(container_id)

    codes = await engine.exit_codes(container_id, since=parse_docker_timestamp(info["Created"])[0])

    assert codes[0] == 9


async def test_docker_healthcheck_reaches_healthy(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app("healthcheck")
    results: list[ProbeResult] = []
    check = HealthCheck(type="http", path="/", interval=0.2, timeout=1, retries=50)

    report = await wait_until_healthy(engine, container_id, APP_PORT, check, on_probe=results.append)

    assert report.docker_health == "healthy"
    assert (await engine.inspect(container_id))["State"]["Health"]["Status"] == "healthy"
    assert all(result.docker_health == "healthy" for result in results if result.passed)
    assert not any(result.passed for result in results if result.docker_health != "healthy")


async def test_docker_healthcheck_unhealthy_fails(sandbox: Sandbox) -> None:
    """The external probe passes; the image's HEALTHCHECK turns `unhealthy`, which contains `healthy`."""
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app("healthcheck", environment={"HEALTH_FAIL": "1"})
    results: list[ProbeResult] = []
    check = HealthCheck(type="http", path="/", interval=0.2, timeout=1, retries=200)

    with pytest.raises(HealthCheckFailed) as caught:
        await wait_until_healthy(engine, container_id, APP_PORT, check, on_probe=results.append)

    assert "unhealthy" in caught.value.reason
    assert not any(result.passed for result in results)
    assert any(result.error is None for result in results)


ENVIRONMENT = {
    "JT_DOLLAR": "a$b",
    "JT_DOUBLE_DOLLAR": "$$kept",
    "JT_BRACES": "${HOME}",
    "JT_TRAILING_DOLLAR": "end$",
    "JT_NEWLINES": "line one\nline two\n",
    "JT_CRLF": "a\r\nb",
    "JT_YES": "yes",
    "JT_OCTAL": "0755",
    "JT_NULL": "null",
    "JT_EMPTY": "",
    "JT_SPACES": "  padded  ",
    "JT_QUOTES": "it's \"quoted\" `x`",
    "JT_BACKSLASH": "C:\\path\\n",
    "JT_EQUALS": "a=b=c",
    "JT_UNICODE": "grüße ✓",
    "JT_TAB": "a\tb",
}


async def test_environment_reaches_container_exactly(sandbox: Sandbox) -> None:
    engine = sandbox.engine
    container_id, _, _ = await sandbox.start_app(environment=ENVIRONMENT)
    await wait_until_healthy(engine, container_id, APP_PORT, FAST_HTTP)
    address = await published_address(engine, container_id)
    inspected_env = (await engine.inspect(container_id))["Config"]["Env"]

    for key, value in ENVIRONMENT.items():
        response = await get(address, f"/cgi-bin/env?{key}")
        assert response.status_code == 200, key
        assert response.content == value.encode(), key
        assert f"{key}={value}" in inspected_env, key

    assert (await get(address, "/cgi-bin/env?JT_NOT_SET")).status_code == 404


class StreamErrorImages:
    """Stand-in for aiodocker's images API whose pull stream reports an error after HTTP 200."""

    def __init__(self, raise_itself: bool) -> None:
        self.raise_itself = raise_itself

    async def pull(self, ref: str, *, stream: bool) -> AsyncIterator[dict[str, Any]]:
        yield {"status": f"Pulling from {ref}"}
        message = "unauthorized: authentication required"
        if self.raise_itself:
            raise DockerStreamError(message, error_detail={"message": message})
        yield {"errorDetail": {"message": message}, "error": message}


@pytest.mark.parametrize("raise_itself", [False, True])
async def test_pull_stream_error_raises_registry_text(raise_itself: bool) -> None:
    engine = DockerEngine(DOCKER_URL)
    engine._docker.images = StreamErrorImages(raise_itself)  # type: ignore[assignment]

    try:
        with pytest.raises(ImagePullError) as caught:
            await engine.pull(image("v1"))
    finally:
        await engine.close()

    assert caught.value.message == f"pulling image {image('v1')} failed: unauthorized: authentication required"


def test_parse_log_chunks_joins_partial_messages() -> None:
    chunks = [
        "2026-01-02T03:04:05.000000001Z first part ",
        "2026-01-02T03:04:05.000000002Z second part\n",
        "2026-01-02T03:04:06Z next\r\n2026-01-02T03:04:07.5Z carriage\rreturn inside\n",
    ]

    entries = parse_log_chunks(chunks, "stderr")

    assert [entry.text for entry in entries] == ["first part second part", "next", "carriage\rreturn inside"]
    assert {entry.stream for entry in entries} == {"stderr"}
    assert entries[0].nanoseconds == 1
    assert entries[2].timestamp.microsecond == 500000
