"""API tokens: create, look up by bearer value, list and revoke. Only a SHA-256 of each token is stored."""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from jarvis_deploy.auth.schemas import IMPLIED_SCOPES, Scope
from jarvis_deploy.db.models import ApiToken
from jarvis_deploy.errors import Conflict, Forbidden, NotFound

TOKEN_PREFIX = "jd_"
# 32 random bytes: 256 bits, as the token is the only credential.
TOKEN_BYTES = 32
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """The token a request was made with."""

    name: str
    scopes: frozenset[Scope]
    projects: frozenset[str] | None

    def allows(self, scope: Scope) -> bool:
        return any(scope in IMPLIED_SCOPES[held] for held in self.scopes)

    def may_touch(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def check_project(self, project: str) -> None:
        if not self.may_touch(project):
            raise Forbidden(f"token {self.name!r} is not allowed to touch project {project!r}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create(
    session: AsyncSession, *, name: str, scopes: list[Scope], projects: list[str] | None
) -> tuple[ApiToken, str]:
    """Store a new token and return it with its bearer value, which is not stored anywhere."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    statement = (
        insert(ApiToken)
        .values(
            id=uuid.uuid4(),
            name=name,
            token_hash=hash_token(token),
            scopes=sorted(scope.value for scope in scopes),
            projects=projects,
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(ApiToken)
    )
    row = (await session.execute(statement)).scalar_one_or_none()
    if row is None:
        raise Conflict(f"a token named {name!r} exists already; choose another name or revoke it first")
    return row, token


async def authenticate(session: AsyncSession, token: str) -> Principal | None:
    """Return the principal of a valid, unrevoked token, or None."""
    row = await session.scalar(
        select(ApiToken).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None))
    )
    if row is None:
        return None

    now = datetime.now(UTC)
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    projects = frozenset(row.projects) if row.projects is not None else None
    return Principal(row.name, frozenset(Scope(scope) for scope in row.scopes), projects)


async def list_all(session: AsyncSession) -> list[ApiToken]:
    return list((await session.execute(select(ApiToken).order_by(ApiToken.created_at))).scalars())


async def revoke(session: AsyncSession, token_id: uuid.UUID) -> ApiToken:
    row = await session.get(ApiToken, token_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await session.flush()
    return row
