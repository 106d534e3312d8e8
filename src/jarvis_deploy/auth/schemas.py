"""Tokens, scopes and audit records as the API shows them."""

import uuid
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jarvis_deploy.naming import PROJECT_NAME


class Scope(StrEnum):
    READ = "read"
    DEPLOY = "deploy"
    ADMIN = "admin"


# A scope includes the ones after it: admin can deploy and read, deploy can read.
IMPLIED_SCOPES = {
    Scope.ADMIN: {Scope.ADMIN, Scope.DEPLOY, Scope.READ},
    Scope.DEPLOY: {Scope.DEPLOY, Scope.READ},
    Scope.READ: {Scope.READ},
}


class TokenCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "ci-billing", "scopes": ["deploy"], "projects": ["billing-api"]}]},
    )

    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    scopes: list[Scope] = Field(..., min_length=1, description="`read`, `deploy` and/or `admin`.")
    projects: list[str] | None = Field(
        None, max_length=100, description="Project names the token may touch; omit for every project."
    )

    @field_validator("projects")
    @classmethod
    def _validate_projects(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not PROJECT_NAME.match(name):
                raise ValueError(f"project name {name!r} must match ^[a-z0-9][a-z0-9_-]*$")
        return sorted(set(value))


class TokenRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    scopes: list[Scope]
    projects: list[str] | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(..., description="The bearer token. It is shown only in this response; store it now.")


class AuditRecordRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    token_name: str | None
    method: str
    path: str
    project: str | None
    deployment_id: uuid.UUID | None
    status_code: int
