"""Request and response models of the webhooks API."""

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    Strict,
    field_validator,
)

MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 512


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://ci.example.com/hooks/jarvis", "project_id": "0b7c6f0e-3f0c-4c59-9a59-2d8f8e7f4a10"}]
        },
    )

    url: HttpUrl = Field(..., description="http or https URL that receives the POSTs.")
    project_id: uuid.UUID | None = Field(
        None, description="Send events of this project only; omit for every project (needs a token for every project)."
    )
    secret: Annotated[SecretStr, Strict()] | None = Field(
        None,
        description=(
            f"HMAC-SHA256 signing secret, {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters; "
            "generated when omitted. It is returned only in this response."
        ),
    )

    @field_validator("secret")
    @classmethod
    def _validate_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # The message gives lengths only: a secret value must never appear in an error.
        if value is None:
            return None
        length = len(value.get_secret_value())
        if not MIN_SECRET_LENGTH <= length <= MAX_SECRET_LENGTH:
            raise ValueError(f"must have {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} characters, not {length}")
        return value


class WebhookRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    project_id: uuid.UUID | None = Field(None, description="null: the webhook receives events of every project.")
    created_at: datetime


class WebhookCreated(WebhookRead):
    secret: str = Field(
        ..., description="The signing secret. It is shown only in this response and stored encrypted; keep it now."
    )


class WebhookDeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    deployment_id: uuid.UUID
    event_type: str = Field(..., description="`deployment.<status>`, such as `deployment.succeeded`.")
    attempt: int = Field(..., description="1 for the first attempt of this event, 2 for the first retry, and so on.")
    created_at: datetime = Field(..., description="Time the attempt was recorded, right after it ended.")
    status_code: int | None = Field(None, description="HTTP status of the response; null when no response came.")
    error: str | None = Field(None, description="Why the attempt failed: a non-2xx status or a connection error.")
    duration_ms: int
