"""Job names and enqueueing; job ids derive from the deployment id so a repeated enqueue is a no-op."""

import uuid

import structlog
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession

logger = structlog.get_logger(__name__)

RUN_DEPLOYMENT = "run_deployment"
STOP_DEPLOYMENT = "stop_deployment"


PENDING_JOBS = "pending_jobs"


def after_commit(session: AsyncSession, function: str, deployment_id: uuid.UUID) -> None:
    """Keep a job back until the session's transaction commits, so no job reads a row that was rolled back."""
    session.info.setdefault(PENDING_JOBS, []).append((function, deployment_id))


def pop_pending(session: AsyncSession) -> list[tuple[str, uuid.UUID]]:
    return session.info.pop(PENDING_JOBS, [])


def job_id(function: str, deployment_id: uuid.UUID) -> str:
    return f"{function}:{deployment_id}"


async def enqueue(redis: ArqRedis, queue_name: str, function: str, deployment_id: uuid.UUID) -> bool:
    """Enqueue one job; returns False when a job with the same id is queued or running already."""
    job = await redis.enqueue_job(
        function,
        str(deployment_id),
        _job_id=job_id(function, deployment_id),
        _queue_name=queue_name,
    )
    logger.info("job.enqueued", function=function, deployment_id=str(deployment_id), duplicate=job is None)
    return job is not None
