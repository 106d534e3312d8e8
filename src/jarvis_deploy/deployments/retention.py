"""Retention: keep the full spec and events of each project's latest deployments; older ones keep their summary row."""

import uuid

import structlog
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy.db.models import ComposeSpec, Deployment, DeploymentEvent, Project
from jarvis_deploy.deployments.schemas import FINAL_STATUSES

logger = structlog.get_logger(__name__)

PRUNABLE = sorted(status.value for status in FINAL_STATUSES)


async def prune_project(sessionmaker: async_sessionmaker[AsyncSession], project_id: uuid.UUID, keep: int) -> int:
    """Drop the events and spec of the project's finished deployments beyond the newest `keep`; returns how many.

    `keep` 0 keeps everything. Queued, running and live deployments are never pruned. The
    project's row lock keeps a concurrent deploy request from picking up a spec as it goes.
    """
    if keep <= 0:
        return 0

    async with sessionmaker() as session:
        await session.execute(select(Project.id).where(Project.id == project_id).with_for_update())
        newest = select(Deployment.id).where(Deployment.project_id == project_id).order_by(Deployment.version.desc())
        newest_kept = newest.limit(keep)
        pruned = list(
            await session.scalars(
                select(Deployment.id).where(
                    Deployment.project_id == project_id,
                    Deployment.status.in_(PRUNABLE),
                    Deployment.pruned_at.is_(None),
                    Deployment.id.not_in(newest_kept),
                )
            )
        )
        if not pruned:
            await session.rollback()
            return 0

        await session.execute(delete(DeploymentEvent).where(DeploymentEvent.deployment_id.in_(pruned)))
        await session.execute(
            update(Deployment).where(Deployment.id.in_(pruned)).values(spec_id=None, pruned_at=func.now())
        )
        unused = ~exists().where(Deployment.spec_id == ComposeSpec.id)
        specs = await session.execute(
            delete(ComposeSpec).where(ComposeSpec.project_id == project_id, unused).returning(ComposeSpec.id)
        )
        removed_specs = len(specs.all())
        await session.commit()

    logger.info(
        "retention.pruned", project_id=str(project_id), deployments=len(pruned), specs=removed_specs, keep=keep
    )
    return len(pruned)
