"""The upstream resolver process against the test database, and switches that keep client connections open."""

import asyncio
import http.client
import os
import signal
import time
import uuid

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url

from jarvis_deploy import naming
from jarvis_deploy.proxy.addresses import address_at, next_upstream_address
from jarvis_deploy.proxy.caddy import route_id
from jarvis_deploy.proxy.lookup import lookup_name, query_addresses
from jarvis_deploy.proxy.resolver import UpstreamTable, follow_routes
from jarvis_deploy.proxy.routes import TrafficRouter
from tests.caddy import free_port, route_upstreams
from tests.conftest import TEST_LABEL, app_image, wait_for_status
from tests.integration.test_deploy_flow import containers_of

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 10}


async def resolved(resolver: str, name: str, expected: list[str] | None, timeout: float = 5.0) -> list[str] | None:
    """Query until the resolver returns `expected` or `timeout` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = await query_addresses(resolver, name)
        if result == expected or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def test_resolver_follows_stored_route(context, settings, project, upstream_resolver) -> None:
    router = TrafficRouter(context.sessionmaker, None, upstream_resolver, instance=settings.instance_id)
    project_id, name = uuid.UUID(project["id"]), project["name"]
    name_8080 = lookup_name(name, 8080, settings.instance_id)

    assert await query_addresses(upstream_resolver, name_8080) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.2:8080", "127.77.200.1:8080"], None)
    assert await resolved(upstream_resolver, name_8080, ["127.77.200.1", "127.77.200.2"]) == ["127.77.200.1", "127.77.200.2"]
    assert await query_addresses(upstream_resolver, lookup_name(name, 9090, settings.instance_id)) is None
    assert await query_addresses(upstream_resolver, lookup_name(name, 8080, "other-instance")) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.3:8080"], None)
    assert await resolved(upstream_resolver, name_8080, ["127.77.200.3"]) == ["127.77.200.3"]

    # Upstreams on several ports cannot be one A lookup, so the name stops resolving.
    await router.switch(project_id, name, ["r.test"], ["127.0.0.1:40001", "127.0.0.1:40002"], None)
    assert await resolved(upstream_resolver, name_8080, None) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.4:8080"], None)
    assert await resolved(upstream_resolver, name_8080, ["127.77.200.4"]) == ["127.77.200.4"]
    await router.remove(project_id, name)
    assert await resolved(upstream_resolver, name_8080, None) is None


async def wait_for_table(table: UpstreamTable, project: str, expected: list[str] | None, timeout: float = 5.0) -> list[str] | None:
    deadline = time.monotonic() + timeout
    while True:
        result = table.addresses(project, 8080) if table.loaded else "not loaded"
        if result == expected or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.02)


async def test_table_follows_notifications(context, project) -> None:
    """With the periodic read an hour apart, only NOTIFY can bring the switches into the table."""
    router = TrafficRouter(context.sessionmaker, None)
    project_id, name = uuid.UUID(project["id"]), project["name"]
    table = UpstreamTable()
    follower = asyncio.create_task(follow_routes(table, context.settings.database_url, reload_seconds=3600))

    try:
        assert await wait_for_table(table, name, None) is None
        for last_octet in range(1, 4):
            address = f"127.77.202.{last_octet}"
            await router.switch(project_id, name, ["r.test"], [f"{address}:8080"], None)
            assert await wait_for_table(table, name, [address]) == [address]
        await router.remove(project_id, name)
        assert await wait_for_table(table, name, None) is None
    finally:
        follower.cancel()
        await router.remove(project_id, name)


async def test_table_keeps_routes_without_database(context, project) -> None:
    router = TrafficRouter(context.sessionmaker, None)
    project_id = uuid.UUID(project["id"])
    await router.switch(project_id, project["name"], ["r.test"], ["127.77.201.1:8080"], None)
    table = UpstreamTable()
    connection = await asyncpg.connect(make_url(context.settings.database_url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await table.reload(connection)
    finally:
        await connection.close()
        # The worker would otherwise put this stored route into Caddy, a reload that other tests would notice.
        await router.remove(project_id, project["name"])
    assert table.addresses(project["name"], 8080) == ["127.77.201.1"]

    # A database URL on a port where nothing listens replaces a database that went away.
    follower = asyncio.create_task(follow_routes(table, f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"))
    await asyncio.sleep(0.5)
    follower.cancel()
    assert table.addresses(project["name"], 8080) == ["127.77.201.1"]


def send_on(connection: http.client.HTTPConnection, host: str) -> str:
    """Send GET /cgi-bin/version on an open HTTP/1.1 connection and return the body."""
    connection.request("GET", "/cgi-bin/version", headers={"Host": host})
    response = connection.getresponse()
    body = response.read().decode().strip()
    assert response.status == 200, body
    assert not response.will_close
    return body


async def test_switch_keeps_client_connection_open(client, settings, project, caddy, worker) -> None:
    host = f"{project['name']}.keep.test"
    body = {"project_id": project["id"], "port": 8080, "domain": host, "strategy": "blue-green", "healthcheck": HEALTH}

    response = await client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v1")})
    assert response.status_code == 202, response.text
    first = response.json()
    assert (await wait_for_status(client, first["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    async with httpx.AsyncClient(trust_env=False) as admin:
        route = (await admin.get(f"{caddy.admin_url}/id/{route_id(project['name'])}")).json()
    assert route["handle"][0]["dynamic_upstreams"]["name"] == lookup_name(project["name"], 8080, settings.instance_id)

    connection = http.client.HTTPConnection("127.0.0.1", caddy.http_port, timeout=5)
    try:
        assert send_on(connection, host) == "v1"
        socket_before = connection.sock
        for version in ["v2", "v1", "v2"]:
            accepted = (await client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image(version)})).json()
            assert (await wait_for_status(client, accepted["id"], {"succeeded", "failed"}))["status"] == "succeeded"

            # The connection opened before the switch reaches the new version: Caddy did not reload.
            assert send_on(connection, host) == version
            assert connection.sock is socket_before
            upstreams = await route_upstreams(caddy.admin_url, route_id(project["name"]))
            assert upstreams is not None
            assert len(upstreams) == 1
    finally:
        connection.close()


async def wait_for_route(caddy, project: str, expected: list[str], timeout: float = 15.0) -> list[str] | None:
    deadline = time.monotonic() + timeout
    while True:
        upstreams = await route_upstreams(caddy.admin_url, route_id(project))
        if upstreams == expected or time.monotonic() > deadline:
            return upstreams
        await asyncio.sleep(0.2)


async def deploy_while_resolver_hangs(client, resolver_process, body: dict) -> dict:
    """Send a deployment while the resolver is stopped and return it once it has ended."""
    # A stopped process neither responds nor refuses, as a hung resolver would.
    os.kill(resolver_process.process.pid, signal.SIGSTOP)
    try:
        accepted = (await client.post("/api/jarvis/deployments/deploy", json=body)).json()
        return await wait_for_status(client, accepted["id"], {"succeeded", "failed", "rolled_back"})
    finally:
        os.kill(resolver_process.process.pid, signal.SIGCONT)


async def test_failed_switch_gives_route_back(client, project, caddy, worker, resolver_process, docker) -> None:
    """A switch whose resolver does not respond fails, and the stored route names the live version again."""
    host = f"{project['name']}.back.test"
    body = {"project_id": project["id"], "port": 8080, "domain": host, "strategy": "blue-green", "healthcheck": HEALTH}
    first = (await client.post("/api/jarvis/deployments/deploy", json={**body, "image_ref": app_image("v1")})).json()
    assert (await wait_for_status(client, first["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    live_route = await route_upstreams(caddy.admin_url, route_id(project["name"]))
    assert live_route is not None

    done = await deploy_while_resolver_hangs(client, resolver_process, {**body, "image_ref": app_image("v2")})

    assert done["status"] == "failed", done
    assert "resolver" in done["error"]
    assert await wait_for_route(caddy, project["name"], live_route) == live_route
    labels = [container._container["Labels"]["dev.jarvis-deploy.deployment"] for container in await containers_of(docker, project["name"])]
    assert labels == [first["id"]]
    connection = http.client.HTTPConnection("127.0.0.1", caddy.http_port, timeout=10)
    try:
        assert send_on(connection, host) == "v1"
    finally:
        connection.close()


async def test_address_in_use_is_skipped(context, docker) -> None:
    """A stopped container that carries an address keeps it: the next allocation passes over it."""
    network = context.settings.upstream_network
    async with context.sessionmaker() as session:
        row = (await session.execute(text("SELECT last_value, is_called FROM upstream_address_seq"))).one()
    upcoming = address_at(network, row.last_value + 1 if row.is_called else row.last_value)

    container = await docker.containers.create(
        {"Image": app_image("v1"), "Labels": {naming.LABEL_UPSTREAM_ADDRESS: upcoming, TEST_LABEL: "true"}},
        name=f"address-holder-{uuid.uuid4().hex[:8]}",
    )
    try:
        in_use = await context.engine.addresses_in_use(naming.LABEL_UPSTREAM_ADDRESS)
        assert upcoming in in_use

        address = await next_upstream_address(context.sessionmaker, network, in_use)
        assert address is not None
        assert address != upcoming
    finally:
        await container.delete(force=True)


async def test_full_range_returns_none(context) -> None:
    network = "127.77.255.252/30"
    in_use = {address_at(network, number) for number in (1, 2)}

    assert await next_upstream_address(context.sessionmaker, network, in_use) is None


async def test_failed_first_switch_removes_route(client, project, caddy, worker, resolver_process) -> None:
    """With no earlier version to give the route back to, a failed first switch leaves no route behind."""
    host = f"{project['name']}.first.test"
    body = {"project_id": project["id"], "port": 8080, "domain": host, "strategy": "blue-green", "healthcheck": HEALTH}

    done = await deploy_while_resolver_hangs(client, resolver_process, {**body, "image_ref": app_image("v1")})

    assert done["status"] == "failed", done
    assert await route_upstreams(caddy.admin_url, route_id(project["name"])) is None
