"""Deployment plans: POST /api/jarvis/deployments/plan renders a deploy request and diffs it against the live spec.

A plan runs the same validation, safety policy and rendering as a deploy, but stores nothing and
queues nothing. Secrets appear in the plan only as their placeholders, and no ciphertext is written.
"""

import difflib

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.api.deps import SessionDep, SettingsDep
from jarvis_deploy.api.problems import BODY_ERRORS, COMMON_ERRORS, problem_doc
from jarvis_deploy.auth.audit import note_target
from jarvis_deploy.auth.deps import DeployPrincipal
from jarvis_deploy.compose.render import RenderOptions
from jarvis_deploy.db.models import ComposeSpec, Deployment, Project
from jarvis_deploy.deployments.schemas import DeploymentStatus, DeployRequest
from jarvis_deploy.deployments.service import check_and_render
from jarvis_deploy.errors import InvalidRequest

router = APIRouter(prefix="/api/jarvis/deployments", tags=["deployments"], responses=COMMON_ERRORS)

# File labels of the unified diff: `live` is the spec of the project's latest succeeded deployment.
LIVE_LABEL = "live"
PLANNED_LABEL = "planned"


class DeployPlan(BaseModel):
    yaml: str = Field(..., description="The Compose YAML a deploy of this body would store, with secrets as placeholders.")
    checksum: str = Field(..., description="SHA-256 of `yaml`, hex; a deploy of the same body gets this checksum.")
    live_checksum: str | None = Field(
        None, description="Checksum of the project's live spec (its latest succeeded deployment); null when none."
    )
    diff: str = Field(
        ...,
        description=(
            "Unified diff from the live spec to `yaml`; empty when they are equal. Without a live spec every "
            "line is an addition."
        ),
    )


async def live_spec(session: AsyncSession, project: Project) -> ComposeSpec | None:
    """Return the spec of the project's latest succeeded deployment, or None when no deployment succeeded."""
    statement = (
        select(ComposeSpec)
        .join(Deployment, Deployment.spec_id == ComposeSpec.id)
        .where(Deployment.project_id == project.id, Deployment.status == DeploymentStatus.SUCCEEDED.value)
        .order_by(Deployment.version.desc())
        .limit(1)
    )
    return await session.scalar(statement)


def unified_diff(live_yaml: str, planned_yaml: str) -> str:
    lines = difflib.unified_diff(
        live_yaml.splitlines(keepends=True),
        planned_yaml.splitlines(keepends=True),
        fromfile=LIVE_LABEL,
        tofile=PLANNED_LABEL,
    )
    return "".join(lines)


@router.post(
    "/plan",
    response_model=DeployPlan,
    responses={
        **BODY_ERRORS,
        503: problem_doc("A dependency is unavailable, or the request has secrets and JARVIS_SECRET_KEY is unset."),
    },
)
async def plan_deployment(
    body: DeployRequest, request: Request, session: SessionDep, settings: SettingsDep, principal: DeployPrincipal
) -> DeployPlan:
    """Render a deploy request and diff it against the project's live spec, without storing or queueing anything."""
    project = await session.get(Project, body.project_id)
    if project is None:
        raise InvalidRequest(f"no project with id {body.project_id}; create it first", field=("body", "project_id"))
    principal.check_project(project.name)
    note_target(request, project=project.name)

    # The cipher is discarded: it is built only so that a plan with secrets fails with 503 exactly
    # when a deploy would, and nothing is encrypted or stored here.
    rendered, _cipher = check_and_render(body, project.name, RenderOptions.from_settings(settings), settings)
    live = await live_spec(session, project)
    return DeployPlan(
        yaml=rendered.yaml,
        checksum=rendered.checksum,
        live_checksum=live.checksum if live is not None else None,
        diff=unified_diff(live.yaml if live is not None else "", rendered.yaml),
    )
