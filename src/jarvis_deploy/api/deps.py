"""Request dependencies: one database session per request, committed in one place, then queued jobs sent."""

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from arq.connections import ArqRedis
from fastapi import Depends, Request
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy import queue
from jarvis_deploy.config import Settings
from jarvis_deploy.engine.docker import DockerEngine

logger = structlog.get_logger(__name__)

async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await commit_and_dispatch(request, session)


async def commit_and_dispatch(request: Request, session: AsyncSession) -> None:
    """Commit the request's transaction, then send the jobs it queued; endpoints that wait call it early."""
    await session.commit()
    jobs = queue.pop_pending(session)
    settings: Settings = request.app.state.settings
    for function, deployment_id in jobs:
        try:
            await queue.enqueue(request.app.state.redis, settings.queue_name, function, deployment_id)
        except (RedisError, OSError) as error:
            # The row is committed in state `queued`; the reconciler enqueues it once Redis is back.
            logger.warning(
                "job.enqueue_failed", function=function, deployment_id=str(deployment_id), error=str(error)
            )


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> ArqRedis:
    return request.app.state.redis


def get_engine(request: Request) -> DockerEngine:
    return request.app.state.engine


# scope="function" commits (and sends queued jobs) before the response goes out, so a client that
# reads right after a 202 finds the row.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[ArqRedis, Depends(get_redis)]
EngineDep = Annotated[DockerEngine, Depends(get_engine)]
