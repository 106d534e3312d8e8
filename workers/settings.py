"""arq worker settings: shared clients are built at start-up, put into the job context, and closed at shut-down."""

import asyncio
from typing import Any

import structlog
from arq import func
from arq.connections import RedisSettings
from arq.cron import cron

from jarvis_deploy import queue
from jarvis_deploy.config import get_settings
from jarvis_deploy.db.errors import DATABASE_ERRORS, database_unavailable
from jarvis_deploy.deployments import reconcile, recovery, tasks
from jarvis_deploy.deployments.runner import WorkerContext
from jarvis_deploy.logging_config import configure_logging
from jarvis_deploy.proxy.routes import reapply_routes
from jarvis_deploy.secrets.store import ensure_secret_key
from jarvis_deploy.webhooks import delivery

logger = structlog.get_logger(__name__)

settings = get_settings()
DATABASE_RETRY_SECONDS = 2.0
JOB_TIMEOUT_FACTOR = 10
HANDBACK_TRIES = 20


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
        except DATABASE_ERRORS as error:
            if not database_unavailable(error):
                raise
            logger.warning("worker.database_unavailable", error=str(error), retry_in_seconds=DATABASE_RETRY_SECONDS)
            await asyncio.sleep(DATABASE_RETRY_SECONDS)

    caddy = context.router.caddy
    routes = await reapply_routes(context.db_engine, context.router) if caddy else 0
    counts = await _reconcile(ctx)
    logger.info("worker.started", queue=settings.queue_name, routes_reapplied=routes, **counts)


async def shutdown(ctx: dict[str, Any]) -> None:
    context: WorkerContext | None = ctx.get("context")
    if context is not None:
        await context.close()
    logger.info("worker.stopped", queue=settings.queue_name)


async def _reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    """Recover deployments of dead workers, remove orphans, restart stopped live containers, and enqueue lost jobs.

    Each step runs even when an earlier one failed (the Docker Engine may be down while Redis
    is not), and a failed step is logged and tried again in the next round.
    """
    context: WorkerContext = ctx["context"]
    steps = {
        "recovered": lambda: recovery.recover_abandoned(context, settings.heartbeat_timeout),
        "orphans_removed": lambda: recovery.remove_orphans(context),
        "live_restarted": lambda: recovery.restart_stopped_live(context),
        "networks_and_volumes_removed": lambda: recovery.remove_orphan_networks_and_volumes(context),
        "requeued": lambda: reconcile.requeue_lost_jobs(
            context.sessionmaker, ctx["redis"], settings.queue_name, context.db_engine
        ),
    }
    counts = {}
    for name, step in steps.items():
        try:
            counts[name] = await step()
        except Exception as error:  # noqa: BLE001  (one failed step must not stop the others)
            logger.warning("reconcile.step_failed", step=name, error=str(error), error_type=type(error).__name__)
    return counts


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
    return await reapply_routes(context.db_engine, context.router)


class WorkerSettings:
    functions = [
        # keep_result=0 frees the job id at once, so the reconciler can enqueue the same deployment again.
        # Each deployment has its own time limit (job_timeout) inside the job, and a job may run the
        # project's older queued deployments first, so the job's own limit is only a backstop. A job
        # cancelled by a shutdown hands its deployment back and runs again, up to HANDBACK_TRIES times.
        func(
            tasks.run_deployment,
            name=queue.RUN_DEPLOYMENT,
            keep_result=0,
            timeout=settings.job_timeout * JOB_TIMEOUT_FACTOR,
            max_tries=HANDBACK_TRIES,
        ),
        func(tasks.stop_deployment, name=queue.STOP_DEPLOYMENT, keep_result=0, timeout=300, max_tries=3),
        func(delivery.deliver_webhook, name=delivery.DELIVER_WEBHOOK, timeout=settings.webhook_timeout + 30, max_tries=settings.webhook_max_tries),
    ]
    # arq makes a unique cron job's id from its name and time, and job ids are global in Redis, not
    # per queue. The queue name in the job name keeps workers of other queues (other instances, or
    # tests) from taking this queue's runs.
    cron_jobs = [
        cron(
            reconcile_state,
            name=f"cron:{settings.queue_name}:reconcile_state",
            second={0, 30},
            run_at_startup=False,
            unique=True,
        ),
        cron(
            reapply_proxy_routes,
            name=f"cron:{settings.queue_name}:reapply_proxy_routes",
            second=set(range(0, 60, 10)),
            run_at_startup=False,
            unique=True,
        ),
    ]
    on_startup = startup
    on_shutdown = shutdown
    queue_name = settings.queue_name
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    max_jobs = settings.worker_max_jobs
    poll_delay = settings.worker_poll_delay
    job_timeout = settings.job_timeout
    handle_signals = True
    # On SIGTERM: take no new job, give running ones this long, then cancel them (they hand back).
    job_completion_wait = settings.shutdown_grace_seconds
