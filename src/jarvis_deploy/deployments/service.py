"""Deployments: accept, roll back, cancel and stop them, and read state and history. Services flush; callers commit."""

import base64
import binascii
import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import func, literal, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy import policy, queue
from jarvis_deploy.compose.render import (
    RenderedSpec,
    RenderOptions,
    dump_spec,
    escape_interpolation,
    load_spec,
    render,
)
from jarvis_deploy.config import Settings
from jarvis_deploy.db.models import (
    ComposeSpec,
    Deployment,
    DeploymentEvent,
    Project,
    SpecSecret,
)
from jarvis_deploy.deployments.schemas import DeploymentStatus, DeployRequest
from jarvis_deploy.errors import Conflict, Gone, InvalidRequest, NotFound
from jarvis_deploy.secrets.cipher import SecretCipher
from jarvis_deploy.secrets.store import request_cipher, store_spec_secrets

logger = structlog.get_logger(__name__)

STOPPABLE = {DeploymentStatus.SUCCEEDED, DeploymentStatus.IN_PROGRESS}


@dataclass
class DeploymentWithEvents:
    deployment: Deployment
    events: list[DeploymentEvent]


def check_and_render(
    request: DeployRequest, project_name: str, options: RenderOptions, settings: Settings
) -> tuple[RenderedSpec, SecretCipher | None]:
    """Apply the safety policy and render the request. Return the spec and the cipher for its secrets (None without).

    Stores nothing, so a plan calls it as well as `create`. Raises InvalidRequest on a policy violation,
    and SecretsNotConfigured (503) when the request has secrets and JARVIS_SECRET_KEY is unset or invalid.
    """
    policy.check_request(request, settings)
    # Checked before rendering, because the placeholders need the key.
    cipher = request_cipher(options.secret_key) if request.secrets else None
    return render(request, project_name, options), cipher


async def create(
    session: AsyncSession,
    request: DeployRequest,
    options: RenderOptions,
    settings: Settings,
    *,
    requested_by: str | None = None,
) -> Deployment:
    """Store the rendered spec and a queued deployment with the project's next version, then queue its job."""
    project = await session.get(Project, request.project_id, with_for_update=True)
    if project is None:
        raise InvalidRequest(f"no project with id {request.project_id}; create it first", field=("body", "project_id"))
    rendered, cipher = check_and_render(request, project.name, options, settings)
    spec = await _store_spec(session, project.id, rendered.checksum, rendered.yaml)
    if cipher is not None:
        await store_spec_secrets(session, spec.id, request.secrets, cipher)

    return await _queue(
        session,
        project,
        spec,
        image_ref=request.image_ref,
        strategy=request.strategy.value,
        requested_by=requested_by,
        force=request.force,
    )


async def _queue(
    session: AsyncSession,
    project: Project,
    spec: ComposeSpec,
    *,
    image_ref: str,
    strategy: str,
    requested_by: str | None,
    rollback_of: uuid.UUID | None = None,
    force: bool = False,
) -> Deployment:
    """Insert a queued deployment of `spec` with the project's next version, and queue its job after commit.

    The caller holds the project row's lock, so no concurrent request can take the same version.
    """
    latest = await session.scalar(select(func.max(Deployment.version)).where(Deployment.project_id == project.id))
    deployment = Deployment(
        id=uuid.uuid4(),
        project_id=project.id,
        spec_id=spec.id,
        version=(latest or 0) + 1,
        image_ref=image_ref,
        strategy=strategy,
        status=DeploymentStatus.QUEUED.value,
        checksum=spec.checksum,
        requested_by=requested_by,
        rollback_of=rollback_of,
        force=force,
    )
    session.add(deployment)
    await session.flush()
    origin = f" (rollback to the spec of {rollback_of})" if rollback_of else ""
    await add_event(session, deployment.id, "queued", f"version {deployment.version} of {project.name} queued{origin}")
    await session.refresh(deployment)

    queue.after_commit(session, queue.RUN_DEPLOYMENT, deployment.id)
    logger.info(
        "deployment.queued",
        deployment_id=str(deployment.id),
        project=project.name,
        version=deployment.version,
        checksum=spec.checksum,
        requested_by=requested_by,
    )
    return deployment


async def _store_spec(session: AsyncSession, project_id: uuid.UUID, checksum: str, yaml_text: str) -> ComposeSpec:
    """Insert the spec unless the project has one with this checksum already."""
    await session.execute(
        insert(ComposeSpec)
        .values(id=uuid.uuid4(), project_id=project_id, checksum=checksum, yaml=yaml_text)
        .on_conflict_do_nothing(index_elements=["project_id", "checksum"])
    )
    spec = await session.scalar(
        select(ComposeSpec).where(ComposeSpec.project_id == project_id, ComposeSpec.checksum == checksum)
    )
    assert spec is not None
    return spec


async def add_event(
    session: AsyncSession, deployment_id: uuid.UUID, stage: str, message: str, duration_ms: int | None = None
) -> None:
    session.add(DeploymentEvent(deployment_id=deployment_id, stage=stage, message=message, duration_ms=duration_ms))
    await session.flush()


async def get(session: AsyncSession, deployment_id: uuid.UUID) -> Deployment:
    deployment = await session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFound(f"no deployment with id {deployment_id}")
    return deployment


async def get_with_events(session: AsyncSession, deployment_id: uuid.UUID) -> DeploymentWithEvents:
    deployment = await get(session, deployment_id)
    result = await session.execute(
        select(DeploymentEvent).where(DeploymentEvent.deployment_id == deployment_id).order_by(DeploymentEvent.id)
    )
    return DeploymentWithEvents(deployment, list(result.scalars()))


async def get_spec_yaml(session: AsyncSession, deployment_id: uuid.UUID) -> str:
    deployment = await get(session, deployment_id)
    return (await _retained_spec(session, deployment)).yaml


async def _retained_spec(session: AsyncSession, deployment: Deployment) -> ComposeSpec:
    """Return the deployment's spec; raises Gone when retention removed it."""
    spec = await session.get(ComposeSpec, deployment.spec_id) if deployment.spec_id else None
    if spec is None:
        raise Gone(
            f"the spec of deployment {deployment.id} (version {deployment.version}) was removed by retention, "
            "which keeps the specs and events of each project's latest deployments only (JARVIS_RETAIN_DEPLOYMENTS); "
            "its summary remains in the history",
            deployment_id=str(deployment.id),
        )
    return spec


def encode_cursor(deployment: Deployment) -> str:
    raw = f"{deployment.created_at.isoformat()}|{deployment.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, deployment_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(deployment_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as error:
        raise InvalidRequest(
            "cursor is not one this service issued; pass next_cursor from a previous page",
            field=("query", "cursor"),
        ) from error


async def list_page(
    session: AsyncSession,
    *,
    project_id: uuid.UUID | None,
    project_names: frozenset[str] | None,
    status: DeploymentStatus | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Deployment], str | None]:
    """List deployments newest first, one page of `limit` after `cursor`.

    `project_names`, when given, limits the list to those projects (a token's projects).
    """
    statement = select(Deployment).order_by(Deployment.created_at.desc(), Deployment.id.desc()).limit(limit + 1)
    if project_id is not None:
        statement = statement.where(Deployment.project_id == project_id)
    if project_names is not None:
        allowed = select(Project.id).where(Project.name.in_(project_names))
        statement = statement.where(Deployment.project_id.in_(allowed))
    if status is not None:
        statement = statement.where(Deployment.status == status.value)
    if cursor is not None:
        created_at, deployment_id = decode_cursor(cursor)
        statement = statement.where(tuple_(Deployment.created_at, Deployment.id) < tuple_(created_at, deployment_id))

    rows = list((await session.execute(statement)).scalars())
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


async def request_stop(session: AsyncSession, deployment_id: uuid.UUID) -> Deployment:
    """Cancel a queued deployment, or queue a job that stops a running one."""
    deployment = await session.get(Deployment, deployment_id, with_for_update=True)
    if deployment is None:
        raise NotFound(f"no deployment with id {deployment_id}")

    status = DeploymentStatus(deployment.status)
    if status == DeploymentStatus.QUEUED:
        await session.execute(
            update(Deployment)
            .where(Deployment.id == deployment_id)
            .values(status=DeploymentStatus.CANCELLED.value, finished_at=func.now())
        )
        await add_event(session, deployment_id, "cancelled", "cancelled by a stop request before it started")
        await session.refresh(deployment)
        return deployment
    if status == DeploymentStatus.STOPPED:
        return deployment
    if status not in STOPPABLE:
        raise Conflict(
            f"deployment {deployment_id} is {status.value}; only a succeeded or in-progress deployment can be stopped",
            status=status.value,
        )

    await add_event(session, deployment_id, "stop_requested", "stop requested")
    queue.after_commit(session, queue.STOP_DEPLOYMENT, deployment_id)
    logger.info("deployment.stop_requested", deployment_id=str(deployment_id))
    return deployment


async def rollback(session: AsyncSession, source_id: uuid.UUID, *, requested_by: str | None) -> Deployment:
    """Queue a new deployment that runs the stored spec of `source_id` with its image pinned by digest."""
    source = await get(session, source_id)
    project = await session.get(Project, source.project_id, with_for_update=True)
    assert project is not None
    if source.image_digest is None:
        raise Conflict(
            f"deployment {source_id} has no recorded image digest because it never resolved its image; "
            "roll back to a deployment that ran",
            deployment_id=str(source_id),
        )

    spec = await _retained_spec(session, source)
    document = load_spec(spec.yaml)
    document["services"][project.name]["image"] = escape_interpolation(source.image_digest)
    yaml_text = dump_spec(document)
    pinned = await _store_spec(session, project.id, hashlib.sha256(yaml_text.encode()).hexdigest(), yaml_text)

    # Secret ciphertexts belong to a spec; the pinned spec has the same placeholders, so it gets the same rows.
    if pinned.id != spec.id:
        await session.execute(
            insert(SpecSecret)
            .from_select(
                ["spec_id", "name", "ciphertext"],
                select(literal(pinned.id), SpecSecret.name, SpecSecret.ciphertext).where(SpecSecret.spec_id == spec.id),
            )
            .on_conflict_do_nothing()
        )

    return await _queue(
        session,
        project,
        pinned,
        image_ref=source.image_digest,
        strategy=source.strategy,
        requested_by=requested_by,
        rollback_of=source.id,
    )


async def cancel(session: AsyncSession, deployment_id: uuid.UUID) -> Deployment:
    """Cancel a queued deployment; one that has started cannot be cancelled (use stop)."""
    deployment = await session.get(Deployment, deployment_id, with_for_update=True)
    if deployment is None:
        raise NotFound(f"no deployment with id {deployment_id}")
    if deployment.status == DeploymentStatus.CANCELLED.value:
        return deployment
    if deployment.status != DeploymentStatus.QUEUED.value:
        raise Conflict(
            f"deployment {deployment_id} is {deployment.status}; only a queued deployment can be cancelled. "
            "Stop a running one instead",
            status=deployment.status,
        )

    deployment.status = DeploymentStatus.CANCELLED.value
    deployment.finished_at = func.now()
    await session.flush()
    await add_event(session, deployment_id, "cancelled", "cancelled before it started")
    await session.refresh(deployment)
    return deployment
