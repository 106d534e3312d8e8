"""Re-enqueues queued deployments whose job Redis no longer holds, so losing Redis loses no deployment."""

from datetime import UTC, datetime, timedelta

import structlog
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import Job, JobStatus
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jarvis_deploy import queue
from jarvis_deploy.db.locks import try_project_lock
from jarvis_deploy.db.models import Deployment
from jarvis_deploy.deployments.schemas import DeploymentStatus

logger = structlog.get_logger(__name__)

# A job that arq marks in progress while its deployment stays queued this long, with the project's
# lock free, belongs to a worker that died: a live job takes a free lock within milliseconds.
STALE_JOB_AGE = timedelta(seconds=60)


async def requeue_lost_jobs(
    sessionmaker: async_sessionmaker[AsyncSession], redis: ArqRedis, queue_name: str, db_engine: AsyncEngine
) -> int:
    """Enqueue a job for every queued deployment that has none, or only a dead worker's; returns how many."""
    async with sessionmaker() as session:
        result = await session.execute(
            select(Deployment.id, Deployment.project_id, Deployment.created_at)
            .where(Deployment.status == DeploymentStatus.QUEUED.value)
            .order_by(Deployment.created_at)
        )
        rows = result.all()

    enqueued = 0
    for deployment_id, project_id, created_at in rows:
        job_id = queue.job_id(queue.RUN_DEPLOYMENT, deployment_id)
        status = await Job(job_id, redis, _queue_name=queue_name).status()
        if status == JobStatus.in_progress and datetime.now(UTC) - created_at > STALE_JOB_AGE:
            if not await _release_dead_job(db_engine, redis, project_id, job_id):
                continue
        elif status != JobStatus.not_found:
            continue

        if await queue.enqueue(redis, queue_name, queue.RUN_DEPLOYMENT, deployment_id):
            enqueued += 1
            logger.info("reconcile.requeued", deployment_id=str(deployment_id), previous_job_status=status.value)
    return enqueued


async def _release_dead_job(db_engine: AsyncEngine, redis: ArqRedis, project_id, job_id: str) -> bool:
    """Delete the job's arq keys when no live job can own it (the project's lock is free)."""
    async with try_project_lock(db_engine, project_id) as locked:
        if not locked:
            return False
        await redis.delete(in_progress_key_prefix + job_id, job_key_prefix + job_id)
    logger.warning("reconcile.dead_job_released", job_id=job_id)
    return True
