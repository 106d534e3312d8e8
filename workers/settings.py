"""arq worker settings: shared clients are built at start-up, put into the job context, and closed at shut-down."""

import asyncio
from typing import Any

import structlog
from arq import func
from arq.connections import RedisSettings
from arq.cron import cron
from sqlalchemy.exc import InterfaceError, OperationalError

from jarvis_deploy import queue
from jarvis_deploy.config import get_settings
from jarvis_deploy.deployments import reconcile, recovery, tasks
from jarvis_deploy.deployments.runner import WorkerContext
from jarvis_deploy.logging_config import configure_logging
from jarvis_deploy.proxy.routes import reapply_routes
from jarvis_deploy.secrets.store import ensure_secret_key
from jarvis_deploy.webhooks import delivery

logger = structlog.get_logger(__name__)

settings = get_settings()
DATABASE_RETRY_SECONDS = 2.0


async def startup(ctx: dict[str, Any]) -> None:
    configure_logging(settings.log_level, settings.log_json)
    context = WorkerContext.create(settings)
    ctx["context"] = context
    # Refuses to start when stored secrets exist that JARVIS_SECRET_KEY cannot decrypt. While the
    # database is unreachable the worker waits for it instead of exiting.
    while True:
        try:
            await ensure_secret_key(context.sessionmaker, settings.secret_key, "worker")
            break
        except (OperationalError, InterfaceError, OSError) as error:
            logger.warning("worker.database_unavailable", error=str(error), retry_in_seconds=DATABASE_RETRY_SECONDS)
            await asyncio.sleep(DATABASE_RETRY_SECONDS)

    caddy = context.router.caddy
    routes = await reapply_routes(context.db_engine, context.sessionmaker, caddy) if caddy else 0
    counts = await _reconcile(ctx)
    logger.info("worker.started", queue=settings.queue_name, routes_reapplied=routes, **counts)


async def shutdown(ctx: dict[str, Any]) -> None:
    context: WorkerContext | None = ctx.get("context")
    if context is not None:
        await context.close()
    logger.info("worker.stopped", queue=settings.queue_name)


async def _reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    """Recover deployments of dead workers, remove orphaned containers, and enqueue jobs Redis lost."""
    context: WorkerContext = ctx["context"]
    return {
        "recovered": await recovery.recover_abandoned(context, settings.heartbeat_timeout),
        "orphans_removed": await recovery.remove_orphans(context),
        "requeued": await reconcile.requeue_lost_jobs(
            context.sessionmaker, ctx["redis"], settings.queue_name, context.db_engine
        ),
    }


async def reconcile_state(ctx: dict[str, Any]) -> dict[str, int]:
    counts = await _reconcile(ctx)
    if any(counts.values()):
        logger.info("worker.reconciled", **counts)
    return counts


async def reapply_proxy_routes(ctx: dict[str, Any]) -> int:
    """Put back routes Caddy lost; Caddy keeps admin API changes only until it restarts."""
    context: WorkerContext = ctx["context"]
    if context.router.caddy is None:
        return 0
    return await reapply_routes(context.db_engine, context.sessionmaker, context.router.caddy)


class WorkerSettings:
    functions = [
        # keep_result=0 frees the job id at once, so the reconciler can enqueue the same deployment again.
        func(tasks.run_deployment, name=queue.RUN_DEPLOYMENT, keep_result=0, timeout=settings.job_timeout, max_tries=1),
        func(tasks.stop_deployment, name=queue.STOP_DEPLOYMENT, keep_result=0, timeout=300, max_tries=3),
        func(delivery.deliver_webhook, name=delivery.DELIVER_WEBHOOK, timeout=settings.webhook_timeout + 30, max_tries=settings.webhook_max_tries),
    ]
    cron_jobs = [
        cron(reconcile_state, second={0, 30}, run_at_startup=False, unique=True),
        cron(reapply_proxy_routes, second=set(range(0, 60, 10)), run_at_startup=False, unique=True),
    ]
    on_startup = startup
    on_shutdown = shutdown
    queue_name = settings.queue_name
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    max_jobs = settings.worker_max_jobs
    poll_delay = settings.worker_poll_delay
    job_timeout = settings.job_timeout
    handle_signals = True
