"""A deployment's event timeline as Server-Sent Events, read by polling the database."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sse_starlette import ServerSentEvent

from jarvis_deploy.config import Settings
from jarvis_deploy.db.errors import DATABASE_ERRORS, database_unavailable
from jarvis_deploy.db.models import Deployment, DeploymentEvent
from jarvis_deploy.deployments.schemas import DeploymentEventRead, DeploymentStatus

logger = structlog.get_logger(__name__)

# Events are read in pages of this size, so a long history does not come back in one query.
PAGE_SIZE = 500

# An event is sent only once it is this old by the database clock. Event ids come from one
# sequence, so a transaction that took a lower id can commit after one that took a higher id (the
# API's stop request beside a running worker). Waiting lets the lower id appear before the higher
# one is sent, so a client that resumes after the higher id misses nothing.
# NOTE: a transaction that commits more than this long after inserting its event can still be missed.
SETTLE_SECONDS = 0.5

# The runner commits `succeeded` before it writes the `succeeded` event, and recovery does the same
# with `failed`. A stream that reads a final state waits this long for that state's event, then ends.
CLOSING_EVENT_WAIT_SECONDS = 5.0

# The stage of the event that each final state writes last. A superseded deployment got no event
# of its own when it was superseded, so its timeline ends with `succeeded`.
CLOSING_STAGE = {
    DeploymentStatus.SUCCEEDED: "succeeded",
    DeploymentStatus.FAILED: "failed",
    DeploymentStatus.ROLLED_BACK: "rolled_back",
    DeploymentStatus.CANCELLED: "cancelled",
    DeploymentStatus.STOPPED: "stopped",
    DeploymentStatus.SUPERSEDED: "succeeded",
}


@dataclass
class EventPage:
    """One read of a deployment: its state, the settled events after an id, and the id of its closing event."""

    status: DeploymentStatus | None
    events: list[DeploymentEvent]
    closing_event_id: int | None

    def is_complete(self, last_sent_id: int) -> bool:
        """Tell whether the deployment is final and its closing event is at or before `last_sent_id`."""
        return self.closing_event_id is not None and self.closing_event_id <= last_sent_id


async def read_page(session: AsyncSession, deployment_id: uuid.UUID, after_id: int) -> EventPage:
    """Read the deployment's state, then its settled events with ids above `after_id`.

    The state is read first, because under READ COMMITTED each later statement also returns every
    event that was committed before the final state.
    """
    raw_status = await session.scalar(select(Deployment.status).where(Deployment.id == deployment_id))
    if raw_status is None:
        return EventPage(status=None, events=[], closing_event_id=None)
    status = DeploymentStatus(raw_status)

    settled_before = func.clock_timestamp() - text(f"interval '{SETTLE_SECONDS} seconds'")
    result = await session.execute(
        select(DeploymentEvent)
        .where(
            DeploymentEvent.deployment_id == deployment_id,
            DeploymentEvent.id > after_id,
            DeploymentEvent.created_at <= settled_before,
        )
        .order_by(DeploymentEvent.id)
        .limit(PAGE_SIZE)
    )
    events = list(result.scalars())

    closing_event_id = None
    if status in CLOSING_STAGE:
        closing_event_id = await session.scalar(
            select(func.max(DeploymentEvent.id)).where(
                DeploymentEvent.deployment_id == deployment_id,
                DeploymentEvent.stage == CLOSING_STAGE[status],
            )
        )
    return EventPage(status=status, events=events, closing_event_id=closing_event_id)


def to_server_sent_event(event: DeploymentEvent) -> ServerSentEvent:
    """Build the SSE message of one event: its id, its stage as the event type, and its JSON as data."""
    body = DeploymentEventRead.model_validate(event).model_dump_json()
    return ServerSentEvent(data=body, id=str(event.id), event=event.stage)


async def stream_events(
    sessionmaker: async_sessionmaker[AsyncSession],
    deployment_id: uuid.UUID,
    after_id: int,
    settings: Settings,
) -> AsyncIterator[ServerSentEvent]:
    """Yield the deployment's events after `after_id` as they are written, until its closing event.

    The stream also ends after `settings.stream_max_seconds`, when the deployment is deleted, or
    when the database fails. The client then reconnects with Last-Event-ID.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.stream_max_seconds
    last_id = after_id
    final_seen_at: float | None = None
    sent = 0
    log = logger.bind(deployment_id=str(deployment_id))
    log.info("event_stream.opened", after_id=after_id)
    # The reason stays this one when the response closes the generator, on a disconnect or at shutdown.
    reason = "client disconnected or server stopping"
    try:
        while True:
            try:
                async with sessionmaker() as session:
                    page = await read_page(session, deployment_id, last_id)
            except DATABASE_ERRORS as error:
                if not database_unavailable(error):
                    raise
                log.warning("event_stream.database_failed", last_id=last_id, error=str(error))
                reason = "database failed"
                return

            for event in page.events:
                yield to_server_sent_event(event)
                last_id = event.id
                sent += 1
            if len(page.events) == PAGE_SIZE:
                continue

            if page.status is None:
                reason = "deployment deleted"
                return
            if page.is_complete(last_id):
                reason = "complete"
                return
            now = loop.time()
            if page.status in CLOSING_STAGE:
                final_seen_at = final_seen_at if final_seen_at is not None else now
                if now - final_seen_at >= CLOSING_EVENT_WAIT_SECONDS:
                    reason = f"no {CLOSING_STAGE[page.status]} event"
                    return
            if now >= deadline:
                reason = "time limit"
                return
            await asyncio.sleep(min(settings.stream_poll_seconds, deadline - now))
    finally:
        log.info("event_stream.closed", sent=sent, last_id=last_id, reason=reason)
