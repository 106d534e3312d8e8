"""Projects: create, list and look up."""

import uuid

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.db.models import Project
from jarvis_deploy.errors import Conflict, NotFound


async def create(session: AsyncSession, *, name: str) -> Project:
    statement = insert(Project).values(id=uuid.uuid4(), name=name).on_conflict_do_nothing().returning(Project)
    project = (await session.execute(statement)).scalar_one_or_none()
    if project is None:
        raise Conflict(f"a project named {name!r} exists already", project=name)
    return project


async def list_all(session: AsyncSession) -> list[Project]:
    result = await session.execute(select(Project).order_by(Project.name))
    return list(result.scalars())


async def get(session: AsyncSession, project_id: uuid.UUID) -> Project:
    project = await session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project with id {project_id}")
    return project
