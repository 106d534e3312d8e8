"""arq job functions: each loads by id, calls the runner, and logs the outcome."""

import time
import uuid
from typing import Any

import structlog

from jarvis_deploy.deployments import runner

logger = structlog.get_logger(__name__)


async def run_deployment(ctx: dict[str, Any], deployment_id: str) -> str:
    started = time.monotonic()
    status = await runner.run_deployment(ctx["context"], uuid.UUID(deployment_id))
    logger.info("job.finished", job="run_deployment", deployment_id=deployment_id, status=status, seconds=round(time.monotonic() - started, 3))
    return status


async def stop_deployment(ctx: dict[str, Any], deployment_id: str) -> str:
    started = time.monotonic()
    status = await runner.stop_deployment(ctx["context"], uuid.UUID(deployment_id))
    logger.info("job.finished", job="stop_deployment", deployment_id=deployment_id, status=status, seconds=round(time.monotonic() - started, 3))
    return status
