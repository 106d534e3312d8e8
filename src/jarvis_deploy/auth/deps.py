"""Bearer-token dependencies: who is calling, and may they do this."""

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from jarvis_deploy.api.deps import SessionDep
from jarvis_deploy.auth import service
from jarvis_deploy.auth.schemas import Scope
from jarvis_deploy.auth.service import Principal
from jarvis_deploy.errors import Forbidden, Unauthorized

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token from `jarvis-deploy token create` or POST /api/jarvis/tokens.",
)


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """Build a dependency that admits a valid token holding `scope` (or a scope that includes it)."""

    async def dependency(
        request: Request,
        session: SessionDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Principal:
        if credentials is None:
            raise Unauthorized("missing bearer token; send the header `Authorization: Bearer <token>`")

        principal = await service.authenticate(session, credentials.credentials)
        if principal is None:
            raise Unauthorized("the bearer token is unknown or revoked; create a new one with `jarvis-deploy token create`")
        request.state.principal = principal

        if not principal.allows(scope):
            held = ", ".join(sorted(principal.scopes))
            raise Forbidden(f"token {principal.name!r} has scopes [{held}] but this request needs {scope.value!r}")
        return principal

    return dependency


ReadPrincipal = Annotated[Principal, Depends(require(Scope.READ))]
DeployPrincipal = Annotated[Principal, Depends(require(Scope.DEPLOY))]
AdminPrincipal = Annotated[Principal, Depends(require(Scope.ADMIN))]
