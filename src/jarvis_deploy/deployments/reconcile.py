"""Re-enqueues queued deployments whose job Redis no longer holds, so losing Redis loses no deployment."""

import structlog
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy import queue
from jarvis_deploy.db.models import Deployment
from jarvis_deploy.deployments.schemas import DeploymentStatus

logger = structlog.get_logger(__name__)


async def requeue_lost_jobs(
    sessionmaker: async_sessionmaker[AsyncSession], redis: ArqRedis, queue_name: str
) -> int:
    """Enqueue a job for every queued deployment that has none; returns how many were enqueued."""
    async with sessionmaker() as session:
        result = await session.execute(
            select(Deployment.id).where(Deployment.status == DeploymentStatus.QUEUED.value).order_by(Deployment.created_at)
        )
        deployment_ids = list(result.scalars())

    enqueued = 0
    for deployment_id in deployment_ids:
        job = Job(queue.job_id(queue.RUN_DEPLOYMENT, deployment_id), redis, _queue_name=queue_name)
        if await job.status() != JobStatus.not_found:
            continue
        if await queue.enqueue(redis, queue_name, queue.RUN_DEPLOYMENT, deployment_id):
            enqueued += 1
            logger.info("reconcile.requeued", deployment_id=str(deployment_id))
    return enqueued
