"""Webhooks: subscriptions through the admin API, and signed, retried deliveries to a receiver on 127.0.0.1."""

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    api_client,
    app_image,
    create_token,
    free_port,
    wait_for_status,
)

pytestmark = pytest.mark.integration

WEBHOOKS = "/api/jarvis/webhooks"
DEPLOY = "/api/jarvis/deployments/deploy"
HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 50}


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP/1.1 server on 127.0.0.1 that records every request and returns HTTP 500 to the first `fail_first`."""

    fail_first: int = 0
    requests: list[ReceivedRequest] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(ReceivedRequest(request_line[1], headers, body))
            status = "500 Internal Server Error" if len(self.requests) <= self.fail_first else "200 OK"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    async def wait_for(self, count: int, timeout: float = 60) -> list[ReceivedRequest]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {len(self.requests)} requests, expected {count}")
            await asyncio.sleep(0.1)
        return self.requests


async def start_receiver(fail_first: int = 0) -> tuple[Receiver, asyncio.Server]:
    receiver = Receiver(fail_first=fail_first)
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    return receiver, server


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received, server = await start_receiver()
    yield received
    server.close()
    await server.wait_closed()


@pytest.fixture
async def failing_receiver() -> AsyncIterator[Receiver]:
    received, server = await start_receiver(fail_first=2)
    yield received
    server.close()
    await server.wait_closed()


async def subscribe(client: httpx.AsyncClient, url: str, **fields) -> dict:
    response = await client.post(WEBHOOKS, json={"url": url, **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def deploy(client: httpx.AsyncClient, project: dict, **fields) -> dict:
    body = {"project_id": project["id"], "image_ref": app_image("v1"), "port": 8080, **fields}
    response = await client.post(DEPLOY, json=body)
    assert response.status_code == 202, response.text
    return response.json()


def expected_signature(secret: str, request: ReceivedRequest) -> str:
    message = request.headers["x-jarvis-timestamp"].encode() + b"." + request.body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


async def deliveries(client: httpx.AsyncClient, webhook: dict) -> list[dict]:
    response = await client.get(f"{WEBHOOKS}/{webhook['id']}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()


async def test_create_list_delete(client, project):
    response = await client.post(WEBHOOKS, json={"url": "http://127.0.0.1:9/hook", "project_id": project["id"]})

    assert response.status_code == 201, response.text
    created = response.json()
    assert len(created["secret"]) >= 32
    listed = (await client.get(WEBHOOKS)).json()
    assert [item for item in listed if item["id"] == created["id"]] == [
        {key: created[key] for key in ("id", "url", "project_id", "created_at")}
    ]
    assert created["secret"] not in (await client.get(WEBHOOKS)).text

    deleted = await client.delete(f"{WEBHOOKS}/{created['id']}")
    assert deleted.status_code == 204
    assert (await client.get(f"{WEBHOOKS}/{created['id']}/deliveries")).status_code == 404
    assert (await client.delete(f"{WEBHOOKS}/{created['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://127.0.0.1/hook"}, "body.url"),
        ({"url": "not a url"}, "body.url"),
        ({"url": "http://127.0.0.1:9/hook", "secret": "short"}, "body.secret"),
        ({"url": "http://127.0.0.1:9/hook", "project_id": "00000000-0000-4000-8000-000000000000"}, "body.project_id"),
        ({"url": "http://127.0.0.1:9/hook", "events": ["all"]}, "body.events"),
    ],
)
async def test_create_rejects_invalid_body(client, body, field):
    response = await client.post(WEBHOOKS, json=body)

    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


async def test_create_without_secret_key_503(api, client, settings):
    from jarvis_deploy.api.deps import get_settings

    api.dependency_overrides[get_settings] = lambda: settings.model_copy(update={"secret_key": None})
    try:
        response = await client.post(WEBHOOKS, json={"url": "http://127.0.0.1:9/hook"})
    finally:
        api.dependency_overrides.pop(get_settings)

    assert response.status_code == 503, response.text
    assert response.json()["type"].endswith("/secrets-not-configured")
    assert "JARVIS_SECRET_KEY" in response.json()["detail"]


async def test_scope_and_project_limits(api, project, service_env):
    deployer = create_token(service_env, f"hook-deployer-{project['name']}", ["deploy"])
    limited_admin = create_token(service_env, f"hook-limited-{project['name']}", ["admin"], [project["name"]])

    async with api_client(api, deployer) as http:
        assert (await http.get(WEBHOOKS)).status_code == 403
    async with api_client(api, limited_admin) as http:
        everything = await http.post(WEBHOOKS, json={"url": "http://127.0.0.1:9/hook"})
        own = await http.post(WEBHOOKS, json={"url": "http://127.0.0.1:9/hook", "project_id": project["id"]})
        listed = await http.get(WEBHOOKS)

    assert everything.status_code == 403, everything.text
    assert own.status_code == 201, own.text
    assert {item["project_id"] for item in listed.json()} == {project["id"]}


@pytest.mark.usefixtures("worker")
async def test_deployment_sends_one_signed_post(client, project, receiver, worker_log: Path):
    secret = "whsec-" + secrets.token_hex(16)
    webhook = await subscribe(client, receiver.url, project_id=project["id"], secret=secret)

    accepted = await deploy(client, project, host_port=free_port(), healthcheck=HEALTH)
    done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    [request] = await receiver.wait_for(1)
    await asyncio.sleep(2)

    assert len(receiver.requests) == 1
    assert request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-jarvis-signature"] == expected_signature(secret, request)
    assert abs(int(request.headers["x-jarvis-timestamp"]) - time.time()) < 120
    event = json.loads(request.body)
    assert event["type"] == "deployment.succeeded"
    assert event["deployment"]["id"] == accepted["id"]
    assert event["deployment"]["status"] == "succeeded"
    assert event["deployment"]["checksum"] == accepted["checksum"]
    assert event["project"] == {"id": project["id"], "name": project["name"], "created_at": project["created_at"]}
    assert "sent_at" in event
    [attempt] = await deliveries(client, webhook)
    assert attempt["status_code"] == 200
    assert attempt["error"] is None
    assert attempt["attempt"] == 1
    assert attempt["deployment_id"] == accepted["id"]

    stop = await client.post(f"/api/jarvis/deployments/{accepted['id']}/stop")
    assert stop.status_code == 202
    await wait_for_status(client, accepted["id"], {"stopped"})
    stopped = await receiver.wait_for(2)
    assert json.loads(stopped[1].body)["type"] == "deployment.stopped"
    assert stopped[1].headers["x-jarvis-signature"] == expected_signature(secret, stopped[1])
    assert secret not in worker_log.read_text(errors="replace")


@pytest.mark.usefixtures("worker")
async def test_failing_receiver_retried(client, project, failing_receiver):
    webhook = await subscribe(client, failing_receiver.url, project_id=project["id"])

    accepted = await deploy(client, project, host_port=free_port(), healthcheck=HEALTH)
    done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    requests = await failing_receiver.wait_for(3)
    await asyncio.sleep(2)

    assert len(requests) == 3
    assert len({json.loads(request.body)["id"] for request in requests}) == 1
    attempts = sorted(await deliveries(client, webhook), key=lambda item: item["attempt"])
    assert [item["attempt"] for item in attempts] == [1, 2, 3]
    assert [item["status_code"] for item in attempts] == [500, 500, 200]
    assert attempts[0]["error"] == "the receiver returned HTTP 500"
    assert attempts[2]["error"] is None
    assert all(item["duration_ms"] >= 0 for item in attempts)
    after = (await client.get(f"/api/jarvis/deployments/{accepted['id']}")).json()
    assert after["status"] == "succeeded"
    assert after["error"] is None
    assert after["finished_at"] == done["finished_at"]


@pytest.mark.usefixtures("worker")
async def test_other_project_gets_nothing(client, project, receiver):
    other = await client.post("/api/jarvis/projects", json={"name": f"t{secrets.token_hex(5)}"})
    assert other.status_code == 201, other.text
    own_receiver, own_server = await start_receiver()
    try:
        await subscribe(client, receiver.url, project_id=other.json()["id"])
        await subscribe(client, own_receiver.url, project_id=project["id"])

        # A missing image fails fast, and `failed` is a final state that is sent like any other.
        missing = app_image(f"missing-{secrets.token_hex(4)}")
        accepted = await deploy(client, project, image_ref=missing, host_port=free_port())
        done = await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
        assert done["status"] == "failed", done
        [request] = await own_receiver.wait_for(1)
        await asyncio.sleep(2)
    finally:
        own_server.close()
        await own_server.wait_closed()

    assert json.loads(request.body)["type"] == "deployment.failed"
    assert receiver.requests == []
