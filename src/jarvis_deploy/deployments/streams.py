"""HTTP routes that read a deployment's events and container logs, as JSON or as Server-Sent Events."""

import contextlib
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header, Query, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent

from jarvis_deploy.api.deps import EngineDep, SessionDep, SettingsDep
from jarvis_deploy.api.problems import COMMON_ERRORS
from jarvis_deploy.auth.deps import ReadPrincipal
from jarvis_deploy.config import Settings
from jarvis_deploy.deployments import event_feed, log_feed, service
from jarvis_deploy.deployments.endpoints import NOT_FOUND, _accessible_deployment
from jarvis_deploy.deployments.schemas import DeploymentEventRead
from jarvis_deploy.errors import InvalidRequest

router = APIRouter(prefix="/api/jarvis/deployments", tags=["deployments"], responses=COMMON_ERRORS)

EVENT_STREAM = "text/event-stream"
# A send to a client that stopped reading fails after this many seconds, which ends the stream.
SEND_TIMEOUT_SECONDS = 60.0



def wants_event_stream(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "").lower()


def event_source(events: AsyncIterator[ServerSentEvent], settings: Settings) -> EventSourceResponse:
    """Wrap SSE messages in a response that sends a comment heartbeat on idle streams."""
    return EventSourceResponse(
        events,
        ping=settings.stream_heartbeat_seconds,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat"),
        send_timeout=SEND_TIMEOUT_SECONDS,
    )


def parse_last_event_id(value: str | None) -> int:
    if value is None or value.strip() == "":
        return 0
    if not value.strip().isdigit():
        raise InvalidRequest(
            f"Last-Event-ID {value!r} is not an event id. Send the `id` of the last event received",
            field=("header", "Last-Event-ID"),
        )
    return int(value.strip())


@router.get(
    "/{deployment_id}/events",
    response_model=list[DeploymentEventRead],
    responses={
        200: {
            "description": (
                "The event timeline, oldest first. With `Accept: text/event-stream`, a stream of Server-Sent "
                "Events: `id` is the event id, `event` the stage, `data` the event as JSON. It ends after the "
                "event of the deployment's final state."
            ),
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        204: {
            "description": (
                "Last-Event-ID is at or after the closing event of a finished deployment, or retention removed "
                "its events; nothing follows."
            )
        },
        404: NOT_FOUND,
    },
)
async def get_events(
    deployment_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    principal: ReadPrincipal,
    stream_settings: SettingsDep,
    last_event_id: str | None = Header(
        None,
        alias="Last-Event-ID",
        max_length=20,
        description="With `Accept: text/event-stream`: send only events with a higher id.",
    ),
):
    """Read a deployment's event timeline, or follow it live as Server-Sent Events."""
    deployment = await _accessible_deployment(session, principal, deployment_id)
    if not wants_event_stream(request):
        found = await service.get_with_events(session, deployment_id)
        return [DeploymentEventRead.model_validate(event) for event in found.events]
    if deployment.pruned_at is not None:
        # Retention removed the events of this finished deployment, so nothing can follow.
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    after_id = parse_last_event_id(last_event_id)
    if after_id > 0:
        # A browser's EventSource reconnects whenever a stream ends, unless the response is 204.
        page = await event_feed.read_page(session, deployment_id, after_id)
        if not page.events and page.is_complete(after_id):
            return Response(status_code=status.HTTP_204_NO_CONTENT)

    events = event_feed.stream_events(request.app.state.sessionmaker, deployment_id, after_id, stream_settings)
    return event_source(events, stream_settings)


@router.get(
    "/{deployment_id}/logs",
    response_model=log_feed.DeploymentLogsRead,
    response_model_exclude_none=True,
    responses={
        200: {
            "description": (
                "The last lines of each container. With `follow=true`, a stream of Server-Sent Events, one per "
                "line, with the line as JSON in `data`; it ends when every container stopped."
            ),
            "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
        },
        404: NOT_FOUND,
    },
)
async def get_logs(
    deployment_id: uuid.UUID,
    session: SessionDep,
    principal: ReadPrincipal,
    engine: EngineDep,
    settings: SettingsDep,
    stream_settings: SettingsDep,
    tail: int = Query(
        100, ge=1, description="Lines per container, counted from the end. With `follow`, lines per container and stream."
    ),
    follow: bool = Query(False, description="Stream new lines as Server-Sent Events until the containers stop."),
    since: str | None = Query(
        None,
        max_length=64,
        description="Only lines written at or after this time: RFC 3339 with an offset, or Unix seconds.",
    ),
    timestamps: bool = Query(False, description="Add each line's time (UTC) as `timestamp`."),
):
    """Read the lines the deployment's containers wrote, labelled with container and stream, or follow them."""
    if tail > settings.logs_max_tail:
        raise InvalidRequest(f"tail must be at most {settings.logs_max_tail}", field=("query", "tail"))
    since_time = log_feed.parse_since(since)

    deployment = await _accessible_deployment(session, principal, deployment_id)
    if not follow:
        lines = await log_feed.read_recent(engine, deployment.container_owner, tail, since_time, timestamps)
        return log_feed.DeploymentLogsRead(deployment_id=deployment.id, lines=lines)

    containers = await log_feed.deployment_containers(engine, deployment.container_owner)
    lines = log_feed.follow_lines(
        settings.docker_url,
        containers,
        tail=tail,
        since=since_time,
        timestamps=timestamps,
        queue_lines=stream_settings.stream_queue_lines,
        max_seconds=stream_settings.stream_max_seconds,
    )
    return event_source(_log_events(lines), stream_settings)


async def _log_events(lines: AsyncIterator[log_feed.LogLineRead]) -> AsyncIterator[ServerSentEvent]:
    # aclosing runs the reader cleanup in follow_lines as soon as the response closes this generator.
    async with contextlib.aclosing(lines):
        async for line in lines:
            yield ServerSentEvent(data=line.model_dump_json(exclude_none=True))
