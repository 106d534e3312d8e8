"""Request and response models of the projects API."""

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jarvis_deploy.naming import PROJECT_NAME, PROJECT_NAME_MAX_LENGTH


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "billing-api"}]})

    name: str = Field(
        ...,
        min_length=1,
        max_length=PROJECT_NAME_MAX_LENGTH,
        description=(
            "Lower-case letters, digits, `_` and `-`, starting with a letter or digit. It names the Compose "
            f"project and service, so it is limited to {PROJECT_NAME_MAX_LENGTH} characters."
        ),
    )

    @field_validator("name")
    @classmethod
    def _validate_name(cls, value: str) -> str:
        if not PROJECT_NAME.match(value):
            raise ValueError(
                "must match ^[a-z0-9][a-z0-9_-]*$ (lower-case letters, digits, '_' and '-'; names are not lower-cased for you)"
            )
        return value


class ProjectRead(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10",
                    "name": "billing-api",
                    "created_at": "2026-12-04T10:00:00Z",
                }
            ]
        },
    )

    id: uuid.UUID
    name: str
    created_at: datetime
