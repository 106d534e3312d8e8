"""Request and response models of the deployments API."""

import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jarvis_deploy import references
from jarvis_deploy.secrets.cipher import PLACEHOLDER_PREFIX, is_placeholder

VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
NETWORK_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
MAX_ENVIRONMENT_ENTRIES = 500
MAX_ENVIRONMENT_VALUE = 65536


class Strategy(StrEnum):
    RECREATE = "recreate"
    ROLLING = "rolling"
    BLUE_GREEN = "blue-green"


class DeploymentStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    STOPPED = "stopped"


FINAL_STATUSES = frozenset(
    {
        DeploymentStatus.FAILED,
        DeploymentStatus.ROLLED_BACK,
        DeploymentStatus.CANCELLED,
        DeploymentStatus.SUPERSEDED,
        DeploymentStatus.STOPPED,
    }
)


class HealthCheck(BaseModel):
    """External probe that gates a new container before it counts as running."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"type": "http", "path": "/healthz", "interval": 1, "timeout": 2, "retries": 30}]
        },
    )

    type: Literal["http", "tcp"] = Field("http", description="`http` sends GET `path`; `tcp` only connects.")
    path: str = Field("/", description="Request path of the HTTP probe.", max_length=2048)
    host: str | None = Field(None, description="Host header of the HTTP probe.", max_length=253)
    status_min: StrictInt = Field(200, ge=100, le=599, description="Lowest HTTP status that counts as healthy.")
    status_max: StrictInt = Field(399, ge=100, le=599, description="Highest HTTP status that counts as healthy.")
    interval: StrictFloat = Field(1.0, ge=0.05, le=300, description="Seconds between two probes.")
    timeout: StrictFloat = Field(2.0, gt=0, le=300, description="Seconds one probe may take.")
    retries: StrictInt = Field(
        30, ge=1, le=10000, description="Consecutive failed probes, after the start period, that mark the container unhealthy."
    )
    start_period: StrictFloat = Field(
        0, ge=0, le=3600, description="Seconds after start during which failed probes do not count."
    )
    successes: StrictInt = Field(1, ge=1, le=100, description="Consecutive passed probes needed to count as healthy.")

    @field_validator("path")
    @classmethod
    def _validate_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        if any(ch.isspace() or ord(ch) < 32 for ch in value):
            raise ValueError("must not contain white space or control characters")
        return value

    @model_validator(mode="after")
    def _validate_status_range(self) -> "HealthCheck":
        if self.status_min > self.status_max:
            raise ValueError("status_min must not be greater than status_max")
        return self


class Volume(BaseModel):
    """A named volume (`source` is a name) or a bind mount (`source` is an absolute host path)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"source": "data", "target": "/var/lib/app"}]},
    )

    source: str = Field(..., min_length=1, max_length=4096, description="Volume name, or an absolute host path.")
    target: str = Field(..., min_length=1, max_length=4096, description="Absolute path inside the container.")
    read_only: bool = False

    @property
    def is_bind(self) -> bool:
        return self.source.startswith("/")

    @field_validator("source")
    @classmethod
    def _validate_source(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL")
        if value.startswith("/"):
            return value
        if value.startswith((".", "~")):
            raise ValueError("a bind mount source must be an absolute path")
        if not VOLUME_NAME.match(value):
            raise ValueError(
                "must be an absolute path (bind mount) or a volume name matching [a-zA-Z0-9][a-zA-Z0-9_.-]*"
            )
        return value

    @field_validator("target")
    @classmethod
    def _validate_target(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path inside the container")
        if "\x00" in value:
            raise ValueError("must not contain NUL")
        return value


def _check_environment_key(key: str) -> str:
    if "=" in key:
        raise ValueError("an environment variable name must not contain '='")
    if any(ord(ch) < 32 for ch in key):
        raise ValueError("an environment variable name must not contain NUL or other control characters")
    return key


EnvironmentKey = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_check_environment_key)]
EnvironmentValue = Annotated[StrictStr, Field(max_length=MAX_ENVIRONMENT_VALUE)]
# SecretStr masks the value in repr() and model_dump(mode="json"), so logging the request shows no
# secret. Its length is checked in `_validate_secrets`, whose message reads better than SecretStr's.
SecretValue = Annotated[SecretStr, Strict()]
SECRETS_DESCRIPTION = (
    "Environment variables whose values are encrypted at rest, never stored in the Compose YAML, "
    "never returned or logged, and injected into the container when it is created. Same key and value "
    "rules as `environment`, and a key may not be in both. The stored YAML holds a placeholder "
    f"`{PLACEHOLDER_PREFIX}<hex>` for each value. Needs JARVIS_SECRET_KEY on the service, otherwise 503."
)


class DeployRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
                    "image_ref": "localhost:5000/testapp:v1",
                    "port": 8080,
                    "host_port": 18080,
                    "environment": {"APP_MODE": "production", "DB_PASSWORD": "abc$def"},
                    "volumes": [{"source": "data", "target": "/data"}],
                    "strategy": "recreate",
                    "healthcheck": {"type": "http", "path": "/", "interval": 1},
                }
            ]
        },
    )

    project_id: uuid.UUID
    image_ref: str = Field(
        ...,
        max_length=512,
        description="Image reference: `[registry[:port]/]repository[:tag][@digest]`.",
    )
    port: StrictInt = Field(..., ge=1, le=65535, description="Port the application listens on inside the container.")
    host_port: StrictInt | None = Field(
        None, ge=1, le=65535, description="Host port of the direct mapping when there is no domain; defaults to `port`."
    )
    domain: list[str] | str | None = Field(
        None,
        description=(
            "Host name(s) routed to the container through Caddy, at most 50. Wildcards (`*.example.com`) and "
            "Unicode names are accepted."
        ),
        examples=["app.example.com"],
    )
    environment: dict[EnvironmentKey, EnvironmentValue] = Field(
        default_factory=dict,
        description=(
            f"Environment variables, at most {MAX_ENVIRONMENT_ENTRIES} entries. Names have 1 to 1024 characters; "
            f"values must be JSON strings of at most {MAX_ENVIRONMENT_VALUE} characters and reach the container "
            "byte for byte."
        ),
    )
    secrets: dict[EnvironmentKey, SecretValue] = Field(default_factory=dict, description=SECRETS_DESCRIPTION)
    volumes: list[Volume] = Field(
        default_factory=list, max_length=50, description="Named volumes and bind mounts, at most 50."
    )
    networks: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="Extra Docker networks to attach the container to, at most 20, each name at most 128 characters.",
    )
    strategy: Strategy = Strategy.RECREATE
    replicas: StrictInt = Field(1, ge=1, le=20, description="Number of containers to run.")
    parallelism: StrictInt = Field(
        1, ge=1, le=20, description="Rolling strategy: containers replaced per batch."
    )
    healthcheck: HealthCheck | None = Field(
        None, description="External probe; without one a TCP connect to `port` gates the container."
    )
    force: StrictBool = Field(
        False,
        description=(
            "JSON `true` or `false`. Run the deployment even when nothing changed. Without it, a request whose spec checksum and image "
            "digest equal the live deployment's, with that deployment's containers running and healthy, "
            "succeeds at once and leaves those containers serving."
        ),
    )

    @field_validator("image_ref")
    @classmethod
    def _validate_image_ref(cls, value: str) -> str:
        references.parse_image_reference(value)
        return value

    @field_validator("domain")
    @classmethod
    def _validate_domain(cls, value: list[str] | str | None) -> list[str] | None:
        if value is None:
            return None
        names = [value] if isinstance(value, str) else value
        if not names:
            return None
        if len(names) > 50:
            raise ValueError("at most 50 domains")

        normalized = [references.normalize_domain(name) for name in names]
        return sorted(set(normalized))

    @field_validator("environment")
    @classmethod
    def _validate_environment(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENVIRONMENT_ENTRIES:
            raise ValueError(f"at most {MAX_ENVIRONMENT_ENTRIES} entries")
        for key, item in value.items():
            if "\x00" in item:
                raise ValueError(f"value of {key!r} must not contain NUL")
            if is_placeholder(item):
                raise ValueError(
                    f"value of {key!r} starts with {PLACEHOLDER_PREFIX!r}, which marks secret placeholders; "
                    "pass it under `secrets` instead"
                )
        return value

    @field_validator("secrets")
    @classmethod
    def _validate_secrets(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # Messages name the key only: a secret value must never appear in an error.
        if len(value) > MAX_ENVIRONMENT_ENTRIES:
            raise ValueError(f"at most {MAX_ENVIRONMENT_ENTRIES} entries")
        for key, item in value.items():
            text = item.get_secret_value()
            if len(text) > MAX_ENVIRONMENT_VALUE:
                raise ValueError(f"value of {key!r} is longer than {MAX_ENVIRONMENT_VALUE} characters")
            if "\x00" in text:
                raise ValueError(f"value of {key!r} must not contain NUL")
        return value

    @field_validator("networks")
    @classmethod
    def _validate_networks(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == "default":
                raise ValueError("'default' is the project's own network and is always attached")
            if not NETWORK_NAME.match(name) or len(name) > 128:
                raise ValueError(f"network {name!r} must match [a-zA-Z0-9][a-zA-Z0-9_.-]* (at most 128 characters)")
        return sorted(set(value))

    @field_validator("strategy")
    @classmethod
    def _validate_strategy(cls, value: Strategy, info: ValidationInfo) -> Strategy:
        if value != Strategy.RECREATE and not info.data.get("domain"):
            raise ValueError(
                f"{value.value} needs a domain, because it switches traffic through Caddy and two versions "
                "cannot publish the same host port at once. Add `domain`, or use strategy `recreate`"
            )
        return value

    @field_validator("replicas")
    @classmethod
    def _validate_replicas(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and not info.data.get("domain"):
            raise ValueError("more than one replica needs a domain, because one host port cannot be published twice")
        return value

    @model_validator(mode="after")
    def _validate_secret_keys(self) -> "DeployRequest":
        both = sorted(set(self.environment) & set(self.secrets))
        if both:
            raise ValueError(f"{', '.join(repr(key) for key in both)} must be in either environment or secrets, not both")
        return self

    @model_validator(mode="after")
    def _validate_mounts(self) -> "DeployRequest":
        targets = [volume.target for volume in self.volumes]
        duplicates = sorted({target for target in targets if targets.count(target) > 1})
        if duplicates:
            raise ValueError(f"volumes: target {duplicates[0]!r} is mounted more than once")
        return self

    @property
    def domains(self) -> list[str]:
        return list(self.domain or [])


class ProjectRef(BaseModel):
    id: uuid.UUID
    name: str


class DeploymentEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    stage: str
    message: str
    duration_ms: int | None = None


class DeploymentRead(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "6a4f3c36-8d1e-4c39-9f7b-1d8bb3f1a2e4",
                    "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
                    "version": 3,
                    "status": "queued",
                    "image_ref": "localhost:5000/testapp:v1",
                    "strategy": "recreate",
                    "checksum": "9f2c...",
                    "error": None,
                    "created_at": "2026-12-04T10:00:00Z",
                    "started_at": None,
                    "finished_at": None,
                }
            ]
        },
    )

    id: uuid.UUID
    project_id: uuid.UUID
    version: int
    status: DeploymentStatus
    image_ref: str
    strategy: Strategy
    checksum: str = Field(..., description="SHA-256 of the stored Compose YAML, hex.")
    image_digest: str | None = Field(
        None, description="Registry digest of the image the worker ran (`repository@sha256:...`); set once resolved."
    )
    requested_by: str | None = Field(None, description="Name of the token that requested the deployment.")
    rollback_of: uuid.UUID | None = Field(None, description="The deployment whose spec this rollback runs again.")
    force: bool = Field(False, description="Whether the request asked to run even when nothing changed.")
    reused_from: uuid.UUID | None = Field(
        None,
        description=(
            "Set when the deployment changed nothing: the earlier deployment whose containers kept running "
            "and serve this one."
        ),
    )
    pruned_at: datetime | None = Field(
        None,
        description=(
            "When retention removed this deployment's spec and events (JARVIS_RETAIN_DEPLOYMENTS); the summary "
            "stays, and it can no longer be rolled back to."
        ),
    )
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class DeploymentDetail(DeploymentRead):
    events: list[DeploymentEventRead] = Field(default_factory=list)


class DeploymentPage(BaseModel):
    items: list[DeploymentRead]
    next_cursor: str | None = Field(None, description="Pass as `cursor` to read the next page; null on the last page.")


class LogLine(BaseModel):
    container: str
    stream: Literal["stdout", "stderr"]
    text: str


class DeploymentLogs(BaseModel):
    deployment_id: uuid.UUID
    lines: list[LogLine]
