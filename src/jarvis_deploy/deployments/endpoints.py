"""HTTP routes under /api/jarvis/deployments."""

import asyncio
import time
import uuid

from fastapi import APIRouter, Header, Query, Request, Response, status

from jarvis_deploy.api.deps import SessionDep, SettingsDep, commit_and_dispatch
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth.audit import note_target
from jarvis_deploy.auth.deps import DeployPrincipal, ReadPrincipal
from jarvis_deploy.auth.service import Principal
from jarvis_deploy.compose.render import RenderOptions
from jarvis_deploy.db.models import Deployment, Project
from jarvis_deploy.deployments import idempotency, service
from jarvis_deploy.deployments.schemas import (
    FINAL_STATUSES,
    DeploymentDetail,
    DeploymentEventRead,
    DeploymentPage,
    DeploymentRead,
    DeploymentStatus,
    DeployRequest,
)
from jarvis_deploy.webhooks.delivery import notify_final_state

router = APIRouter(prefix="/api/jarvis/deployments", tags=["deployments"], responses=COMMON_ERRORS)

NOT_FOUND = problem_doc("No deployment with this id.")
GONE = problem_doc("Retention removed the deployment's spec; its summary remains in the history.")
WAIT_MAX_SECONDS = 600
WAIT_POLL_SECONDS = 0.2
# States in which a deploy request with `wait` stops waiting: every final one, and succeeded.
FINAL_OR_LIVE = {state.value for state in FINAL_STATUSES} | {DeploymentStatus.SUCCEEDED.value}


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
    wait: float = Query(
        0,
        ge=0,
        le=WAIT_MAX_SECONDS,
        description=(
            "Seconds to wait for a final state before answering: 200 with the final deployment, or 202 "
            f"with its current state when the time runs out. At most {WAIT_MAX_SECONDS}."
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

    deployment = await service.create(
        session, body, RenderOptions.from_settings(settings), settings, requested_by=principal.name
    )
    if idempotency_key is not None and digest is not None:
        await idempotency.remember(
            session, principal.name, idempotency_key, digest, deployment, settings.idempotency_key_ttl
        )
    note_target(request, deployment_id=deployment.id)
    response.headers["Location"] = str(request.url_for("get_deployment", deployment_id=deployment.id))
    if wait > 0:
        await commit_and_dispatch(request, session)
        deployment = await _wait_for_final_state(session, deployment.id, wait)
        if deployment.status in FINAL_OR_LIVE:
            response.status_code = status.HTTP_200_OK
    return DeploymentRead.model_validate(deployment)


async def _wait_for_final_state(session, deployment_id: uuid.UUID, seconds: float) -> Deployment:
    deadline = time.monotonic() + seconds
    while True:
        session.expire_all()
        deployment = await service.get(session, deployment_id)
        await session.commit()
        if deployment.status in FINAL_OR_LIVE or time.monotonic() >= deadline:
            return deployment
        await asyncio.sleep(min(WAIT_POLL_SECONDS, max(deadline - time.monotonic(), 0)))


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
    "/{deployment_id}/rollback",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentRead,
    responses={
        404: NOT_FOUND,
        409: problem_doc("The deployment has no recorded image digest."),
        410: GONE,
    },
)
async def rollback_deployment(
    deployment_id: uuid.UUID, request: Request, response: Response, session: SessionDep, principal: DeployPrincipal
) -> DeploymentRead:
    """Queue a new deployment that runs this deployment's stored spec with its image pinned by digest."""
    await _accessible_deployment(session, principal, deployment_id)
    deployment = await service.rollback(session, deployment_id, requested_by=principal.name)
    note_target(request, deployment_id=deployment.id)
    response.headers["Location"] = str(request.url_for("get_deployment", deployment_id=deployment.id))
    return DeploymentRead.model_validate(deployment)


@router.post(
    "/{deployment_id}/cancel",
    response_model=DeploymentRead,
    responses={404: NOT_FOUND, 409: problem_doc("The deployment has started; stop it instead.")},
)
async def cancel_deployment(
    deployment_id: uuid.UUID, request: Request, session: SessionDep, principal: DeployPrincipal
) -> DeploymentRead:
    """Cancel a deployment that is still queued."""
    await _accessible_deployment(session, principal, deployment_id)
    note_target(request, deployment_id=deployment_id)
    deployment = await service.cancel(session, deployment_id)
    await commit_and_dispatch(request, session)
    await notify_final_state(request.app.state, deployment_id)
    return DeploymentRead.model_validate(deployment)


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
    if deployment.status == DeploymentStatus.CANCELLED.value:
        # A queued deployment is cancelled here at once; a running one reaches `stopped` in the worker.
        await commit_and_dispatch(request, session)
        await notify_final_state(request.app.state, deployment_id)
    return DeploymentRead.model_validate(deployment)


@router.get(
    "/{deployment_id}/compose",
    response_class=Response,
    responses={
        200: {"content": {"application/yaml": {}}, "description": "The stored Compose YAML."},
        404: NOT_FOUND,
        410: GONE,
    },
)
async def get_compose(deployment_id: uuid.UUID, session: SessionDep, principal: ReadPrincipal) -> Response:
    """Return the stored Compose document of a deployment, byte for byte as checksummed."""
    await _accessible_deployment(session, principal, deployment_id)
    yaml_text = await service.get_spec_yaml(session, deployment_id)
    return Response(content=yaml_text.encode(), media_type="application/yaml")
