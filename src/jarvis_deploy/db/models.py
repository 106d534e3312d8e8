"""Tables: projects, their Compose specs, deployments and the deployments' event timeline."""

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from jarvis_deploy.db.base import Base

STATUS_VALUES = (
    "queued",
    "in_progress",
    "succeeded",
    "failed",
    "rolled_back",
    "cancelled",
    "superseded",
    "stopped",
)
STRATEGY_VALUES = ("recreate", "rolling", "blue-green")


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ComposeSpec(Base):
    """A rendered Compose document, stored once per project and checksum."""

    __tablename__ = "compose_specs"
    __table_args__ = (UniqueConstraint("project_id", "checksum"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    checksum: Mapped[str] = mapped_column(String(64))
    yaml: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SpecSecret(Base):
    """The Fernet ciphertext of one secret of a spec, whose YAML contains only the secret's placeholder."""

    __tablename__ = "spec_secrets"

    spec_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("compose_specs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(1024), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("project_id", "version"),
        CheckConstraint(_in("status", STATUS_VALUES), name="status"),
        CheckConstraint(_in("strategy", STRATEGY_VALUES), name="strategy"),
        Index("ix_deployments_project_id_created_at", "project_id", "created_at"),
        Index("ix_deployments_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    # NULL once retention removed the spec and the events; the row stays as the summary.
    spec_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("compose_specs.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(Integer)
    image_ref: Mapped[str] = mapped_column(String(512))
    strategy: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    checksum: Mapped[str] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The registry digest of the image the worker ran (`repository@sha256:...`), beside the requested tag.
    image_digest: Mapped[str | None] = mapped_column(String(512))
    requested_by: Mapped[str | None] = mapped_column(String(100))
    rollback_of: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deployments.id", ondelete="SET NULL"))
    # Run even when nothing changed; without it a request equal to the live deployment is a no-op.
    force: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Set on a no-op deployment: the earlier deployment whose containers kept running and serve this one.
    reused_from: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deployments.id", ondelete="SET NULL"))
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def container_owner(self) -> uuid.UUID:
        """The deployment whose label the containers serving this one carry."""
        return self.reused_from or self.id


class DeploymentEvent(Base):
    __tablename__ = "deployment_events"
    __table_args__ = (Index("ix_deployment_events_deployment_id_id", "deployment_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    deployment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    # clock_timestamp, not now(): events written in one transaction still get their own times.
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    stage: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    duration_ms: Mapped[int | None] = mapped_column(Integer)


class ProxyRoute(Base):
    """The Caddy route of a project as it should be; the worker re-applies it after Caddy restarts."""

    __tablename__ = "proxy_routes"

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    route_id: Mapped[str] = mapped_column(String(128), unique=True)
    hosts: Mapped[list[str]] = mapped_column(JSONB)
    upstreams: Mapped[list[str]] = mapped_column(JSONB)
    deployment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("deployments.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class ApiToken(Base):
    """An API token; only the SHA-256 of the token is stored, so a leaked table gives no token."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSONB)
    # Project names the token may touch; NULL means every project.
    projects: Mapped[list[str] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditRecord(Base):
    """One mutating API request: who made it, what it did, and how it ended."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    token_name: Mapped[str | None] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(2048))
    project: Mapped[str | None] = mapped_column(String(63))
    deployment_id: Mapped[uuid.UUID | None] = mapped_column()
    status_code: Mapped[int] = mapped_column(Integer)


class IdempotencyKey(Base):
    """An `Idempotency-Key` of a deploy request, with a digest of the body it came with."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    token_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(64))
    deployment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookSubscription(Base):
    """A URL that receives a signed POST when a deployment of its project (or of any project) ends."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    url: Mapped[str] = mapped_column(String(2048))
    # NULL subscribes to every project.
    project_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    # Fernet ciphertext of the HMAC signing secret, under JARVIS_SECRET_KEY.
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One attempt to POST an event to a webhook: its HTTP status code or the error, and how long it took."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_subscription_id_id", "subscription_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    subscription_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"))
    deployment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.clock_timestamp())
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
