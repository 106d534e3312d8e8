"""The upstream resolver process against the test database, and switches that keep client connections open."""

import http.client
import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from jarvis_deploy.db.session import create_sessionmaker
from jarvis_deploy.proxy.caddy import route_id
from jarvis_deploy.proxy.lookup import lookup_name, query_addresses
from jarvis_deploy.proxy.resolver import UpstreamTable
from jarvis_deploy.proxy.routes import TrafficRouter
from tests.caddy import free_port, route_upstreams
from tests.conftest import app_image, wait_for_status

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 10}


async def test_resolver_follows_stored_route(context, settings, project, upstream_resolver) -> None:
    router = TrafficRouter(context.sessionmaker, None, upstream_resolver, instance=settings.instance_id)
    project_id, name = uuid.UUID(project["id"]), project["name"]
    name_8080 = lookup_name(name, 8080, settings.instance_id)

    assert await query_addresses(upstream_resolver, name_8080) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.2:8080", "127.77.200.1:8080"], None)
    assert await query_addresses(upstream_resolver, name_8080) == ["127.77.200.1", "127.77.200.2"]
    assert await query_addresses(upstream_resolver, lookup_name(name, 9090, settings.instance_id)) is None
    assert await query_addresses(upstream_resolver, lookup_name(name, 8080, "other-instance")) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.3:8080"], None)
    assert await query_addresses(upstream_resolver, name_8080) == ["127.77.200.3"]

    # Upstreams on several ports cannot be one A lookup, so the name stops resolving.
    await router.switch(project_id, name, ["r.test"], ["127.0.0.1:40001", "127.0.0.1:40002"], None)
    assert await query_addresses(upstream_resolver, name_8080) is None

    await router.switch(project_id, name, ["r.test"], ["127.77.200.4:8080"], None)
    await router.remove(project_id, name)
    assert await query_addresses(upstream_resolver, name_8080) is None


async def test_table_keeps_last_answer_without_database(context, project) -> None:
    router = TrafficRouter(context.sessionmaker, None)
    project_id = uuid.UUID(project["id"])
    await router.switch(project_id, project["name"], ["r.test"], ["127.77.201.1:8080"], None)
    table = UpstreamTable(context.sessionmaker)
    assert await table.addresses(project["name"], 8080) == ["127.77.201.1"]

    # A database URL on a port where nothing listens replaces a database that went away.
    unreachable = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    table.sessionmaker = create_sessionmaker(unreachable)
    try:
        assert await table.addresses(project["name"], 8080) == ["127.77.201.1"]
        with pytest.raises(LookupError):
            await table.addresses("never-asked", 8080)
    finally:
        await unreachable.dispose()
        # The worker would otherwise put this stored route into Caddy, a reload that other tests would notice.
        await router.remove(project_id, project["name"])


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
