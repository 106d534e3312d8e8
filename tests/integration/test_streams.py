"""Server-Sent Events of deployment events and followed container logs, against a real API process and worker.

httpx's ASGI transport returns a response only once the application finished it, so the streams
are read from an API process started with `jarvis-deploy api` on a free loopback port. It shares
the database of the other tests, and the in-process `client` fixture deploys and stops.
"""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    api_process,
    app_image,
    create_token,
    free_port,
    wait_for_status,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("worker")]

HEALTH = {"type": "http", "path": "/cgi-bin/health", "interval": 0.2, "timeout": 1, "retries": 100}
EVENT_STREAM = {"Accept": "text/event-stream"}
# Heartbeat interval of the API process, short so a test can wait for one.
HEARTBEAT_SECONDS = 1
STREAM_TIMEOUT = 90


@dataclass
class Message:
    """One Server-Sent Events message: its fields, or the text of a comment line."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    comment: str | None = None

    def json(self) -> dict:
        return json.loads(self.data)


@dataclass
class SseReader:
    """Messages of one streamed response, read one at a time. `ended` is set once the server closed it."""

    response: httpx.Response
    ended: bool = False
    _lines: AsyncIterator[str] | None = field(default=None, repr=False)

    async def next(self, timeout: float = STREAM_TIMEOUT) -> Message | None:
        """Return the next message or comment, or None when the server ended the stream."""
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        message = Message()
        has_field = False
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if line == "":
                    if has_field:
                        return message
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    return Message(comment=value)
                has_field = True
                if name == "data":
                    message.data = f"{message.data}\n{value}" if message.data else value
                elif name in ("id", "event"):
                    setattr(message, name, value)
        self.ended = True
        return None

    async def events(self, timeout: float = STREAM_TIMEOUT) -> list[Message]:
        """Read every remaining message, without comments, until the server ends the stream."""
        messages = []
        deadline = time.monotonic() + timeout
        while (message := await self.next(max(0.1, deadline - time.monotonic()))) is not None:
            if message.comment is None:
                messages.append(message)
        return messages


@pytest.fixture(scope="module")
def api_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stream-api") / "api.log"


@pytest.fixture(scope="module")
def api_url(service_env: dict[str, str], api_log: Path) -> Iterator[str]:
    """Base URL of an API process on the test database, stopped at the end."""
    env = {**service_env, "JARVIS_STREAM_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}
    with api_process(env, api_log) as url:
        yield url


@pytest.fixture
async def live(api_url: str, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API process with the admin token."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    timeout = httpx.Timeout(10, read=STREAM_TIMEOUT)
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=timeout) as http:
        yield http


@asynccontextmanager
async def open_stream(http: httpx.AsyncClient, path: str, **kwargs) -> AsyncIterator[SseReader]:
    async with http.stream("GET", path, **kwargs) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)


async def deploy(client: httpx.AsyncClient, project: dict, **fields) -> dict:
    body = {"project_id": project["id"], "port": 8080, "image_ref": app_image("v1"), "healthcheck": HEALTH, **fields}
    response = await client.post("/api/jarvis/deployments/deploy", json=body)
    assert response.status_code == 202, response.text
    return response.json()


async def timeline(client: httpx.AsyncClient, deployment_id: str) -> list[dict]:
    response = await client.get(f"/api/jarvis/deployments/{deployment_id}/events")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_events_stream_live_from_queued_to_succeeded(client, live, project):
    # START_DELAY keeps the container unhealthy for 2 s, so the stream is open while the deployment runs.
    accepted = await deploy(client, project, host_port=free_port(), environment={"START_DELAY": "2"})
    path = f"/api/jarvis/deployments/{accepted['id']}/events"

    async with open_stream(live, path, headers=EVENT_STREAM) as stream:
        first = await stream.next()
        assert first is not None
        status_at_first_event = (await client.get(f"/api/jarvis/deployments/{accepted['id']}")).json()["status"]
        messages = [first, *await stream.events()]
        assert stream.ended

    assert status_at_first_event in {"queued", "in_progress"}
    stages = [message.event for message in messages]
    assert stages[0] == "queued"
    assert stages[-1] == "succeeded"
    assert "in_progress" in stages
    assert "healthy" in stages

    ids = [int(message.id) for message in messages]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for message in messages:
        body = message.json()
        assert body["id"] == int(message.id)
        assert body["stage"] == message.event

    stored = await timeline(client, accepted["id"])
    assert [message.json() for message in messages] == stored


async def test_events_resume_after_last_event_id(client, live, project, api_log):
    accepted = await deploy(client, project, host_port=free_port(), environment={"START_DELAY": "2"})
    path = f"/api/jarvis/deployments/{accepted['id']}/events"

    async with open_stream(live, path, headers=EVENT_STREAM) as stream:
        first_part = [await stream.next(), await stream.next()]
    assert all(message is not None and message.comment is None for message in first_part)
    resume_from = first_part[-1].id

    async with open_stream(live, path, headers={**EVENT_STREAM, "Last-Event-ID": resume_from}) as stream:
        rest = await stream.events()
        assert stream.ended

    stored = await timeline(client, accepted["id"])
    received = [message.json() for message in first_part + rest]
    assert received == stored
    assert stored[-1]["stage"] == "succeeded"
    assert all(int(message.id) > int(resume_from) for message in rest)

    # The client closed the first stream after two events, and the API logs that its generator ended.
    deadline = time.monotonic() + 10
    while "client disconnected" not in api_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the API did not log the closed event stream"
        await asyncio.sleep(0.2)

    finished = await live.get(path, headers={**EVENT_STREAM, "Last-Event-ID": str(stored[-1]["id"])})
    assert finished.status_code == 204

    middle = stored[len(stored) // 2]
    async with open_stream(live, path, headers={**EVENT_STREAM, "Last-Event-ID": str(middle["id"])}) as stream:
        after_middle = await stream.events()
    assert [message.json() for message in after_middle] == [event for event in stored if event["id"] > middle["id"]]


async def test_events_rejects_invalid_last_event_id(client, project):
    accepted = await deploy(client, project, host_port=free_port())

    response = await client.get(
        f"/api/jarvis/deployments/{accepted['id']}/events", headers={**EVENT_STREAM, "Last-Event-ID": "abc"}
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "header.Last-Event-ID"
    await wait_for_status(client, accepted["id"], {"succeeded", "failed"})


async def test_logs_follow_until_stopped(client, live, project):
    accepted = await deploy(client, project, host_port=free_port())
    assert (await wait_for_status(client, accepted["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    path = f"/api/jarvis/deployments/{accepted['id']}/logs"
    container = f"{project['name']}-v1-1"

    async with open_stream(live, path, params={"follow": "true", "timestamps": "true"}) as stream:
        startup: list[dict] = []
        while not {"stdout", "stderr"} <= {line["stream"] for line in startup}:
            message = await stream.next()
            assert message is not None, f"stream ended after {startup}"
            if message.comment is None:
                startup.append(message.json())
        assert any(line["text"] == "testapp v1 listening on 8080" for line in startup), startup
        assert any(line["text"].startswith("testapp v1 started with pid") for line in startup), startup
        assert all(line["container"] == container for line in startup)
        assert all(parse_time(line["timestamp"]).tzinfo is not None for line in startup)

        # Nothing is written while the app idles, so a heartbeat comment comes next.
        heartbeat = await stream.next(timeout=HEARTBEAT_SECONDS * 5)
        assert heartbeat is not None
        assert heartbeat.comment == "heartbeat"

        latest = max(parse_time(line["timestamp"]) for line in startup)
        later_only = {"follow": "true", "since": (latest + timedelta(microseconds=1)).isoformat()}
        async with open_stream(live, path, params=later_only) as since_stream:
            stop = await client.post(f"/api/jarvis/deployments/{accepted['id']}/stop")
            assert stop.status_code == 202
            after_since = [message.json() for message in await since_stream.events()]
            assert since_stream.ended

        rest = [message.json() for message in await stream.events()]
        assert stream.ended

    assert [line["text"] for line in rest] == ["testapp v1 stopping"]
    assert rest[0]["stream"] == "stdout"
    assert [line["text"] for line in after_since] == ["testapp v1 stopping"]
    assert "timestamp" not in after_since[0]
    await wait_for_status(client, accepted["id"], {"stopped"})


async def test_logs_since_and_timestamps(client, project):
    accepted = await deploy(client, project, host_port=free_port())
    assert (await wait_for_status(client, accepted["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    path = f"/api/jarvis/deployments/{accepted['id']}/logs"

    plain = (await client.get(path)).json()
    assert plain["lines"]
    assert all("timestamp" not in line for line in plain["lines"])

    stamped = (await client.get(path, params={"timestamps": "true"})).json()["lines"]
    assert [line["text"] for line in stamped] == [line["text"] for line in plain["lines"]]
    times = sorted(parse_time(line["timestamp"]) for line in stamped)

    after_all = await client.get(path, params={"since": (times[-1] + timedelta(seconds=1)).isoformat()})
    assert after_all.status_code == 200
    assert after_all.json()["lines"] == []

    from_first = await client.get(path, params={"since": times[0].isoformat().replace("+00:00", "Z")})
    assert len(from_first.json()["lines"]) == len(stamped)

    unix_seconds = f"{times[-1].timestamp() + 1:.6f}"
    assert (await client.get(path, params={"since": unix_seconds})).json()["lines"] == []
    unix_before = str(int(times[0].timestamp()) - 1)
    assert len((await client.get(path, params={"since": unix_before})).json()["lines"]) == len(stamped)

    for invalid in ("yesterday", "2024-05-01T12:00:00", "-5"):
        response = await client.get(path, params={"since": invalid})
        assert response.status_code == 422, invalid
        assert response.json()["errors"][0]["field"] == "query.since"

    too_long = await client.get(path, params={"tail": 10**9})
    assert too_long.status_code == 422


async def test_streams_require_a_token(api, project, client):
    from tests.conftest import api_client

    accepted = await deploy(client, project, host_port=free_port())
    paths = [
        (f"/api/jarvis/deployments/{accepted['id']}/events", EVENT_STREAM, {}),
        (f"/api/jarvis/deployments/{accepted['id']}/events", {}, {}),
        (f"/api/jarvis/deployments/{accepted['id']}/logs", {}, {"follow": "true"}),
        (f"/api/jarvis/deployments/{accepted['id']}/logs", {}, {}),
    ]
    async with api_client(api) as anonymous:
        for path, headers, params in paths:
            response = await anonymous.get(path, headers=headers, params=params)
            assert response.status_code == 401, path
            assert response.headers["content-type"].startswith("application/problem+json")
    await wait_for_status(client, accepted["id"], {"succeeded", "failed"})


async def test_streams_reject_token_of_other_project(api, project, client, service_env):
    from tests.conftest import api_client

    other = create_token(service_env, f"other-{secrets.token_hex(3)}", ["read"], ["some-other-project"])
    own = create_token(service_env, f"own-{secrets.token_hex(3)}", ["read"], [project["name"]])
    accepted = await deploy(client, project, host_port=free_port())
    await wait_for_status(client, accepted["id"], {"succeeded", "failed"})
    events = f"/api/jarvis/deployments/{accepted['id']}/events"
    logs = f"/api/jarvis/deployments/{accepted['id']}/logs"

    async with api_client(api, other) as foreign:
        assert (await foreign.get(events, headers=EVENT_STREAM)).status_code == 403
        assert (await foreign.get(events)).status_code == 403
        assert (await foreign.get(logs, params={"follow": "true"})).status_code == 403
        assert (await foreign.get(logs)).status_code == 403

    async with api_client(api, own) as allowed:
        # The deployment is final, so the in-process transport can read the whole stream.
        streamed = await allowed.get(events, headers=EVENT_STREAM)
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert "event: succeeded" in streamed.text
        assert (await allowed.get(logs)).status_code == 200


async def test_unknown_deployment_streams_404(client):
    missing = "00000000-0000-4000-8000-000000000000"
    assert (await client.get(f"/api/jarvis/deployments/{missing}/events", headers=EVENT_STREAM)).status_code == 404
    assert (await client.get(f"/api/jarvis/deployments/{missing}/logs", params={"follow": "true"})).status_code == 404
