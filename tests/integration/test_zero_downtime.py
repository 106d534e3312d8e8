"""Blue-green and rolling deployments through a real Caddy under steady traffic."""

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from jarvis_deploy.proxy.caddy import route_id
from tests.caddy import route_upstreams as caddy_route_upstreams
from tests.conftest import app_image, wait_for_event, wait_for_status
from tests.integration.test_deploy_flow import containers_of

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 10}


@dataclass
class Traffic:
    """Steady requests through Caddy for one domain, recording every status and response body.

    Caddy 2.6 reloads its configuration on every admin API change and closes idle keep-alive
    connections then. A GET sent on such a connection at that moment gets no response at all, and
    RFC 9112 section 9.3.1 lets a client retry it, as browsers, curl and Go's client do. This
    client retries once in exactly that case and counts the retries; any other error, and any
    status other than 2xx, is a failure.
    """

    caddy_port: int
    host: str
    results: list[tuple[float, int | str, str]] = field(default_factory=list)
    retried: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def _loop(self) -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            while not self._stop.is_set():
                try:
                    response = await self._get(http)
                    self.results.append((time.monotonic(), response.status_code, response.text.strip()))
                except httpx.HTTPError as error:
                    self.results.append((time.monotonic(), type(error).__name__, ""))
                await asyncio.sleep(0.01)

    async def _get(self, http: httpx.AsyncClient) -> httpx.Response:
        url = f"http://127.0.0.1:{self.caddy_port}/cgi-bin/version"
        try:
            return await http.get(url, headers={"Host": self.host})
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The server closed the kept-alive connection without a response, so retry on a new one.
            self.retried += 1
            return await http.get(url, headers={"Host": self.host})

    def start(self, clients: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self) -> Counter:
        return Counter(status for _, status, _ in self.results if not (isinstance(status, int) and status < 300))

    def versions(self) -> list[str]:
        return [text for _, status, text in self.results if status == 200]


async def deploy(client, project, **fields) -> dict:
    body = {"project_id": project["id"], "port": 8080, "healthcheck": HEALTH, **fields}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert response.status_code == 202, response.text
    return response.json()


async def deployment_ports(docker, project: str, deployment_id: str) -> set[str]:
    """Loopback addresses and ports published by the running containers of one deployment."""
    ports = set()
    for container in await containers_of(docker, project):
        info = await container.show()
        if info["Config"]["Labels"]["dev.jarvis-deploy.deployment"] != deployment_id:
            continue
        if not info["State"]["Running"]:
            continue
        for binding in info["NetworkSettings"]["Ports"].get("8080/tcp") or []:
            ports.add(f"{binding['HostIp']}:{binding['HostPort']}")
    return ports


async def route_upstreams(caddy_admin: str, project: str) -> list[str] | None:
    return await caddy_route_upstreams(caddy_admin, route_id(project))


async def test_blue_green_drops_no_request(client, project, docker, caddy):
    host = f"{project['name']}.jarvis.test"
    traffic = Traffic(caddy.http_port, host)

    first = await deploy(client, project, image_ref=app_image("v1"), domain=host, strategy="blue-green")
    assert (await wait_for_status(client, first["id"], {"succeeded", "failed", "rolled_back"}))["status"] == "succeeded"

    traffic.start()
    try:
        for number, version in enumerate(["v2", "v1", "v2"], start=2):
            accepted = await deploy(client, project, image_ref=app_image(version), domain=host, strategy="blue-green")
            done = await wait_for_status(client, accepted["id"], {"succeeded", "failed", "rolled_back"})
            assert done["status"] == "succeeded", done
            assert done["version"] == number

            upstreams = await route_upstreams(caddy.admin_url, project["name"])
            assert upstreams is not None
            assert set(upstreams) == await deployment_ports(docker, project["name"], accepted["id"])
            assert len(upstreams) == 1
            switched = [event for event in done["events"] if event["stage"] == "switched"]
            assert len(switched) == 1
    finally:
        await traffic.stop()

    assert traffic.failures() == Counter(), traffic.failures()
    assert len(traffic.results) > 50
    print(f"requests: {len(traffic.results)}, retried after a closed idle connection: {traffic.retried}")
    assert traffic.versions()[-1] == "v2"
    await wait_for_event(client, accepted["id"], "removed_old")
    assert len(await containers_of(docker, project["name"])) == 1


async def replace_v1_under_traffic(client, project, caddy, **fields) -> tuple[dict, dict, Traffic]:
    """Deploy v1 blue-green, then v2 with `fields` under steady traffic; returns v1, v2's final state and the traffic."""
    host = f"{project['name']}.jarvis.test"
    first = await deploy(client, project, image_ref=app_image("v1"), domain=host, strategy="blue-green")
    await wait_for_status(client, first["id"], {"succeeded"})

    traffic = Traffic(caddy.http_port, host)
    traffic.start()
    try:
        second = await deploy(client, project, image_ref=app_image("v2"), domain=host, strategy="blue-green", **fields)
        done = await wait_for_status(client, second["id"], {"succeeded", "failed", "rolled_back"})
    finally:
        await traffic.stop()
    return first, done, traffic


async def test_failed_health_keeps_old_version_serving(client, project, docker, caddy):
    first, done, traffic = await replace_v1_under_traffic(
        client, project, caddy, environment={"HEALTH_FAIL": "1"}, healthcheck={**HEALTH, "retries": 5}
    )

    assert done["status"] == "failed"
    assert "health check failed" in done["error"]
    assert traffic.failures() == Counter()
    assert set(traffic.versions()) == {"v1"}
    assert await deployment_ports(docker, project["name"], done["id"]) == set()
    remaining = await containers_of(docker, project["name"])
    assert [c["Labels"]["dev.jarvis-deploy.deployment"] for c in [item._container for item in remaining]] == [first["id"]]


async def test_slow_start_gets_no_traffic_before_healthy(client, project, caddy):
    _, done, traffic = await replace_v1_under_traffic(
        client, project, caddy, environment={"START_DELAY": "3"}, healthcheck={**HEALTH, "retries": 50}
    )

    assert done["status"] == "succeeded", done
    assert traffic.failures() == Counter()
    healthy = [event for event in done["events"] if event["stage"] == "healthy"]
    assert healthy[0]["duration_ms"] >= 2500
    versions = traffic.versions()
    first_v2 = versions.index("v2")
    assert set(versions[:first_v2]) == {"v1"}
    assert first_v2 > 0


async def test_unhealthy_in_watch_window_rolls_back(client, project, docker, caddy):
    first, done, traffic = await replace_v1_under_traffic(client, project, caddy, environment={"FAIL_AFTER": "3"})

    assert done["status"] == "rolled_back", done
    assert "health" in done["error"]
    assert traffic.failures() == Counter()
    assert traffic.versions()[-1] == "v1"
    assert set(await route_upstreams(caddy.admin_url, project["name"])) == await deployment_ports(
        docker, project["name"], first["id"]
    )
    first_now = (await client.get(f"/api/jarvis/deployments/{first['id']}")).json()
    assert first_now["status"] == "succeeded"


async def _count_healthy(upstreams: list[str]) -> int:
    healthy = 0
    async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
        for upstream in upstreams:
            try:
                response = await http.get(f"http://{upstream}/cgi-bin/health")
                healthy += response.status_code == 200
            except httpx.HTTPError:
                pass
    return healthy


async def test_rolling_keeps_two_healthy_and_restores_on_failure(client, project, docker, caddy):
    host = f"{project['name']}.jarvis.test"
    volumes = [{"source": "starts", "target": "/starts"}]
    common = {"domain": host, "strategy": "rolling", "replicas": 3, "volumes": volumes}

    first = await deploy(client, project, image_ref=app_image("v1"), **common)
    assert (await wait_for_status(client, first["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    old_ports = await deployment_ports(docker, project["name"], first["id"])
    assert len(old_ports) == 3

    # A good rollout: sample the route's healthy upstreams throughout.
    samples: list[int] = []
    second = await deploy(client, project, image_ref=app_image("v2"), **common)
    while True:
        state = (await client.get(f"/api/jarvis/deployments/{second['id']}")).json()["status"]
        upstreams = await route_upstreams(caddy.admin_url, project["name"]) or []
        samples.append(await _count_healthy(upstreams))
        if state not in ("queued", "in_progress"):
            break
    assert state == "succeeded"
    assert min(samples) >= 2, samples
    assert len(await deployment_ports(docker, project["name"], second["id"])) == 3

    # A rollout whose second container fails its health check restores all three old ones.
    third = await deploy(
        client,
        project,
        image_ref=app_image("v1"),
        environment={"START_COUNTER_DIR": "/starts/third", "FAIL_FROM_START": "2"},
        **{**common, "healthcheck": {**HEALTH, "retries": 5}},
    )
    done = await wait_for_status(client, third["id"], {"succeeded", "failed", "rolled_back"})
    assert done["status"] == "failed", done
    restored = await deployment_ports(docker, project["name"], second["id"])
    assert len(restored) == 3
    assert set(await route_upstreams(caddy.admin_url, project["name"])) == restored
    assert await deployment_ports(docker, project["name"], third["id"]) == set()


async def test_routes_come_back_after_caddy_restart(client, project, caddy):
    host = f"{project['name']}.jarvis.test"
    first = await deploy(client, project, image_ref=app_image("v1"), domain=host, strategy="blue-green")
    await wait_for_status(client, first["id"], {"succeeded"})
    before = await route_upstreams(caddy.admin_url, project["name"])

    await asyncio.to_thread(caddy.restart)

    deadline = time.monotonic() + 20
    after = None
    while time.monotonic() < deadline and after is None:
        await asyncio.sleep(0.5)
        after = await route_upstreams(caddy.admin_url, project["name"])
    assert after == before
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"http://127.0.0.1:{caddy.http_port}/cgi-bin/version", headers={"Host": host})
    assert response.text.strip() == "v1"


async def test_domain_change_moves_route(client, project, caddy):
    old_host = f"{project['name']}.jarvis.test"
    new_host = f"new-{project['name']}.jarvis.test"
    first = await deploy(client, project, image_ref=app_image("v1"), domain=old_host, strategy="blue-green")
    await wait_for_status(client, first["id"], {"succeeded"})

    second = await deploy(client, project, image_ref=app_image("v2"), domain=new_host, strategy="blue-green")
    done = await wait_for_status(client, second["id"], {"succeeded", "failed", "rolled_back"})

    assert done["status"] == "succeeded", done
    async with httpx.AsyncClient(trust_env=False) as http:
        moved = await http.get(f"http://127.0.0.1:{caddy.http_port}/cgi-bin/version", headers={"Host": new_host})
        left = await http.get(f"http://127.0.0.1:{caddy.http_port}/cgi-bin/version", headers={"Host": old_host})
    assert moved.text.strip() == "v2"
    assert left.text.strip() not in {"v1", "v2"}
