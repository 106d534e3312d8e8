"""HTTP routes under /api/jarvis/projects."""

import uuid

from fastapi import APIRouter, Query, Request, status

from jarvis_deploy.api.deps import SessionDep
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth.audit import note_target
from jarvis_deploy.auth.deps import AdminPrincipal, ReadPrincipal
from jarvis_deploy.deployments import service as deployment_service
from jarvis_deploy.deployments.schemas import (
    DeploymentPage,
    DeploymentRead,
    DeploymentStatus,
)
from jarvis_deploy.projects import service
from jarvis_deploy.projects.schemas import ProjectCreate, ProjectRead

router = APIRouter(prefix="/api/jarvis/projects", tags=["projects"], responses=COMMON_ERRORS)



@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectRead,
    responses={**BODY_ERRORS, 409: problem_doc("A project with this name exists.")},
)
async def create_project(
    body: ProjectCreate, request: Request, session: SessionDep, principal: AdminPrincipal
) -> ProjectRead:
    """Create a project (admin scope); its name becomes the Compose project and service name."""
    note_target(request, project=body.name)
    project = await service.create(session, name=body.name)
    return ProjectRead.model_validate(project)


@router.get("", response_model=list[ProjectRead])
async def list_projects(session: SessionDep, principal: ReadPrincipal) -> list[ProjectRead]:
    """List the projects the token may touch, by name."""
    projects = await service.list_all(session)
    return [ProjectRead.model_validate(project) for project in projects if principal.may_touch(project.name)]


@router.get("/{project_id}", response_model=ProjectRead, responses={404: problem_doc("No project with this id.")})
async def get_project(project_id: uuid.UUID, session: SessionDep, principal: ReadPrincipal) -> ProjectRead:
    """Read one project."""
    project = await service.get(session, project_id)
    principal.check_project(project.name)
    return ProjectRead.model_validate(project)


@router.get("/{project_id}/deployments", response_model=DeploymentPage, responses={404: problem_doc("No project with this id.")})
async def list_project_deployments(
    project_id: uuid.UUID,
    session: SessionDep,
    principal: ReadPrincipal,
    status_filter: DeploymentStatus | None = Query(None, alias="status", description="Only deployments in this state."),
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page."),
) -> DeploymentPage:
    """Read a project's deployment history, newest first: versions, images and digests, who asked, outcomes."""
    project = await service.get(session, project_id)
    principal.check_project(project.name)

    rows, next_cursor = await deployment_service.list_page(
        session, project_id=project.id, project_names=None, status=status_filter, limit=limit, cursor=cursor
    )
    return DeploymentPage(items=[DeploymentRead.model_validate(row) for row in rows], next_cursor=next_cursor)
