"""HTTP routes under /api/jarvis/projects."""

import uuid

from fastapi import APIRouter, status

from jarvis_deploy.api.deps import SessionDep
from jarvis_deploy.api.problems import Problem
from jarvis_deploy.projects import service
from jarvis_deploy.projects.schemas import ProjectCreate, ProjectRead

router = APIRouter(prefix="/api/jarvis/projects", tags=["projects"])

PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectRead,
    responses={409: {**PROBLEM, "description": "A project with this name exists."}, 422: PROBLEM},
)
async def create_project(body: ProjectCreate, session: SessionDep) -> ProjectRead:
    """Create a project; its name becomes the Compose project and service name."""
    project = await service.create(session, name=body.name)
    return ProjectRead.model_validate(project)


@router.get("", response_model=list[ProjectRead])
async def list_projects(session: SessionDep) -> list[ProjectRead]:
    """List all projects by name."""
    return [ProjectRead.model_validate(project) for project in await service.list_all(session)]


@router.get("/{project_id}", response_model=ProjectRead, responses={404: PROBLEM, 422: PROBLEM})
async def get_project(project_id: uuid.UUID, session: SessionDep) -> ProjectRead:
    """Read one project."""
    return ProjectRead.model_validate(await service.get(session, project_id))
