"""FastAPI application factory; the lifespan builds the database engine, Redis and Docker clients once."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from arq.connections import ArqRedis
from fastapi import FastAPI

from jarvis_deploy import __version__
from jarvis_deploy.api import health
from jarvis_deploy.api.limits import BodySizeLimitMiddleware
from jarvis_deploy.api.problems import register_problem_handlers
from jarvis_deploy.auth import endpoints as auth_endpoints
from jarvis_deploy.auth.audit import audit_middleware
from jarvis_deploy.config import Settings, get_settings
from jarvis_deploy.db.errors import DATABASE_ERRORS, database_unavailable
from jarvis_deploy.db.session import create_engine, create_sessionmaker
from jarvis_deploy.deployments import endpoints as deployment_endpoints
from jarvis_deploy.deployments import plans
from jarvis_deploy.deployments import streams as deployment_streams
from jarvis_deploy.engine.docker import DockerEngine
from jarvis_deploy.logging_config import configure_logging
from jarvis_deploy.projects import endpoints as project_endpoints
from jarvis_deploy.secrets.store import ensure_secret_key
from jarvis_deploy.webhooks import endpoints as webhook_endpoints

logger = structlog.get_logger(__name__)

DESCRIPTION = """
Runs container images on a Docker host. A deployment request names a project, an image and a port,
and optionally domains, environment, volumes, networks, a strategy and a health check. The service
renders a Compose document, stores it with its SHA-256 checksum, and a worker carries it out.

Every endpoint except /healthz, /readyz and these docs needs `Authorization: Bearer <token>`.
Create the first admin token on the host with `jarvis-deploy token create --name NAME --scope admin`,
then use the Authorize button above.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db_engine = create_engine(settings.database_url)
        # Connections open lazily, so the API starts (and /readyz reports) while Redis or Docker is down.
        redis = ArqRedis.from_url(settings.redis_url)
        app.state.settings = settings
        app.state.db_engine = db_engine
        app.state.sessionmaker = create_sessionmaker(db_engine)
        app.state.redis = redis
        app.state.engine = DockerEngine(settings.docker_url)
        try:
            # Refuses to start when stored secrets exist that JARVIS_SECRET_KEY cannot decrypt. With
            # the database down the check is skipped, so the API still starts and answers 503.
            try:
                await ensure_secret_key(app.state.sessionmaker, settings.secret_key, "api")
            except DATABASE_ERRORS as error:
                if not database_unavailable(error):
                    raise
                logger.warning("secrets.key_check_skipped", reason="database unreachable", error=str(error))
            yield
        finally:
            await app.state.engine.close()
            await redis.aclose()
            await db_engine.dispose()

    app = FastAPI(
        title="jarvis-deploy",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    register_problem_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.middleware("http")(audit_middleware)
    app.include_router(health.router)
    app.include_router(project_endpoints.router)
    app.include_router(plans.router)  # before the deployments router, so `/plan` is not read as a deployment id
    app.include_router(deployment_endpoints.router)
    app.include_router(deployment_streams.router)
    app.include_router(auth_endpoints.router)
    app.include_router(webhook_endpoints.router)
    return app


def create_app_from_environment() -> FastAPI:
    """Entry point for uvicorn's factory mode."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)
