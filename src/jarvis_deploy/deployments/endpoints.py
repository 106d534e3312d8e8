"""HTTP routes under /api/jarvis/deployments."""

import uuid

from fastapi import APIRouter, Header, Query, Request, Response, status

from jarvis_deploy.api.deps import EngineDep, SessionDep, SettingsDep
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth.audit import note_target
from jarvis_deploy.auth.deps import DeployPrincipal, ReadPrincipal
from jarvis_deploy.auth.service import Principal
from jarvis_deploy.db.models import Deployment, Project
from jarvis_deploy.compose.render import RenderOptions
from jarvis_deploy.deployments import idempotency, logs, service
from jarvis_deploy.deployments.schemas import (
    DeploymentDetail,
    DeploymentEventRead,
    DeploymentLogs,
    DeploymentPage,
    DeploymentRead,
    DeploymentStatus,
    DeployRequest,
)
from jarvis_deploy.errors import InvalidRequest

router = APIRouter(prefix="/api/jarvis/deployments", tags=["deployments"], responses=COMMON_ERRORS)

NOT_FOUND = problem_doc("No deployment with this id.")


async def _accessible_deployment(session, principal: Principal, deployment_id: uuid.UUID) -> Deployment:
    """Load a deployment and check that the token may touch its project."""
    deployment = await service.get(session, deployment_id)
    project = await session.get(Project, deployment.project_id)
    principal.check_project(project.name)
    return deployment


@router.post(
    "/deploy",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentRead,
    responses={
        **BODY_ERRORS,
        409: problem_doc("A request with the same Idempotency-Key is being processed."),
        503: problem_doc("A dependency is unavailable, or the request has secrets and JARVIS_SECRET_KEY is unset."),
    },
)
async def deploy(
    body: DeployRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    principal: DeployPrincipal,
    idempotency_key: str | None = Header(
        None,
        alias=idempotency.HEADER,
        description=(
            "Makes a retry safe: the same key with the same body returns the original deployment "
            f"(with `{idempotency.REPLAYED_HEADER}: true`); with another body it is rejected (422)."
        ),
    ),
) -> DeploymentRead:
    """Render and store the Compose spec, queue the deployment, and return it in state `queued`."""
    project = await session.get(Project, body.project_id)
    if project is not None:
        principal.check_project(project.name)
        note_target(request, project=project.name)

    digest = None
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
        digest = idempotency.request_digest(body, settings)
        replayed = await idempotency.find_replay(session, principal.name, idempotency_key, digest)
        if replayed is not None:
            note_target(request, deployment_id=replayed.id)
            response.headers[idempotency.REPLAYED_HEADER] = "true"
            response.headers["Location"] = str(request.url_for("get_deployment", deployment_id=replayed.id))
            return DeploymentRead.model_validate(replayed)

    deployment = await service.create(session, body, RenderOptions.from_settings(settings), settings)
    if idempotency_key is not None and digest is not None:
        await idempotency.remember(
            session, principal.name, idempotency_key, digest, deployment, settings.idempotency_key_ttl
        )
    note_target(request, deployment_id=deployment.id)
    response.headers["Location"] = str(request.url_for("get_deployment", deployment_id=deployment.id))
    return DeploymentRead.model_validate(deployment)


@router.get("", response_model=DeploymentPage)
async def list_deployments(
    session: SessionDep,
    principal: ReadPrincipal,
    project_id: uuid.UUID | None = Query(None, description="Only this project's deployments."),
    status_filter: DeploymentStatus | None = Query(None, alias="status", description="Only deployments in this state."),
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page."),
) -> DeploymentPage:
    """List deployments, newest first."""
    rows, next_cursor = await service.list_page(
        session,
        project_id=project_id,
        project_names=principal.projects,
        status=status_filter,
        limit=limit,
        cursor=cursor,
    )
    return DeploymentPage(items=[DeploymentRead.model_validate(row) for row in rows], next_cursor=next_cursor)


@router.get(
    "/{deployment_id}", response_model=DeploymentDetail, responses={404: NOT_FOUND}
)
async def get_deployment(deployment_id: uuid.UUID, session: SessionDep, principal: ReadPrincipal) -> DeploymentDetail:
    """Read a deployment's state, its error if it failed, and its event timeline."""
    await _accessible_deployment(session, principal, deployment_id)
    found = await service.get_with_events(session, deployment_id)
    detail = DeploymentDetail.model_validate(found.deployment)
    detail.events = [DeploymentEventRead.model_validate(event) for event in found.events]
    return detail


@router.post(
    "/{deployment_id}/stop",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentRead,
    responses={404: NOT_FOUND, 409: problem_doc("The deployment already ended.")},
)
async def stop_deployment(
    deployment_id: uuid.UUID, request: Request, session: SessionDep, principal: DeployPrincipal
) -> DeploymentRead:
    """Stop a deployment: a worker stops and removes its containers, and its state becomes `stopped`."""
    found = await _accessible_deployment(session, principal, deployment_id)
    note_target(request, deployment_id=found.id)
    deployment = await service.request_stop(session, deployment_id)
    return DeploymentRead.model_validate(deployment)


@router.get(
    "/{deployment_id}/compose",
    response_class=Response,
    responses={
        200: {"content": {"application/yaml": {}}, "description": "The stored Compose YAML."},
        404: NOT_FOUND,
    },
)
async def get_compose(deployment_id: uuid.UUID, session: SessionDep, principal: ReadPrincipal) -> Response:
    """Return the stored Compose document of a deployment, byte for byte as checksummed."""
    await _accessible_deployment(session, principal, deployment_id)
    yaml_text = await service.get_spec_yaml(session, deployment_id)
    return Response(content=yaml_text.encode(), media_type="application/yaml")


@router.get(
    "/{deployment_id}/logs", response_model=DeploymentLogs, responses={404: NOT_FOUND}
)
async def get_logs(
    deployment_id: uuid.UUID,
    session: SessionDep,
    principal: ReadPrincipal,
    engine: EngineDep,
    settings: SettingsDep,
    tail: int = Query(100, ge=1, description="Lines per container, counted from the end."),
) -> DeploymentLogs:
    """Read the last lines that the deployment's containers wrote, labelled with container and stream."""
    if tail > settings.logs_max_tail:
        raise InvalidRequest(f"tail must be at most {settings.logs_max_tail}", field=("query", "tail"))

    deployment = await _accessible_deployment(session, principal, deployment_id)
    lines = await logs.read_tail(engine, deployment.id, tail)
    return DeploymentLogs(deployment_id=deployment.id, lines=lines)
