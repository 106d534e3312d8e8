"""Project routes: the database stores each project's desired route, and the worker makes Caddy match it."""

import time
import uuid

import structlog
from sqlalchemy import delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jarvis_deploy.db.locks import try_project_lock
from jarvis_deploy.db.models import Project, ProxyRoute
from jarvis_deploy.proxy.caddy import CaddyClient, CaddyError, RouteNotFound, route_id

logger = structlog.get_logger(__name__)


class TrafficRouter:
    """Points a project's domains at a set of upstreams: first in the database, then in Caddy."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], caddy: CaddyClient | None) -> None:
        self.sessionmaker = sessionmaker
        self.caddy = caddy

    async def switch(
        self,
        project_id: uuid.UUID,
        project: str,
        hosts: list[str],
        upstreams: list[str],
        deployment_id: uuid.UUID | None,
    ) -> float:
        """Send all new requests for `hosts` to `upstreams`; returns the seconds the switch took."""
        if not upstreams:
            raise ValueError(f"cannot route {project} to an empty upstream list; a switch needs at least one upstream")

        started = time.monotonic()
        identifier = route_id(project)
        async with self.sessionmaker() as session:
            previous = await session.get(ProxyRoute, project_id)
            hosts_changed = previous is None or list(previous.hosts) != hosts
            await session.execute(
                insert(ProxyRoute)
                .values(
                    project_id=project_id,
                    route_id=identifier,
                    hosts=hosts,
                    upstreams=upstreams,
                    deployment_id=deployment_id,
                )
                .on_conflict_do_update(
                    index_elements=["project_id"],
                    set_={"hosts": hosts, "upstreams": upstreams, "deployment_id": deployment_id, "updated_at": text("now()")},
                )
            )
            await session.commit()

        if self.caddy is not None and hosts_changed:
            await self.caddy.apply_route(identifier, hosts, upstreams)
        elif self.caddy is not None:
            try:
                await self.caddy.set_upstreams(identifier, upstreams)
            except RouteNotFound:
                # Caddy lost the route, in a restart say.
                await self.caddy.apply_route(identifier, hosts, upstreams)
        seconds = time.monotonic() - started
        logger.info(
            "route.switched", project=project, deployment_id=str(deployment_id), upstreams=len(upstreams), ms=round(seconds * 1000, 1)
        )
        return seconds

    async def route_of(self, project_id: uuid.UUID) -> ProxyRoute | None:
        async with self.sessionmaker() as session:
            return await session.get(ProxyRoute, project_id)

    async def remove(self, project_id: uuid.UUID, project: str) -> None:
        """Delete the project's route, so no request reaches containers that are going away."""
        async with self.sessionmaker() as session:
            await session.execute(delete(ProxyRoute).where(ProxyRoute.project_id == project_id))
            await session.commit()
        if self.caddy is not None:
            await self.caddy.delete_route(route_id(project))
        logger.info("route.removed", project=project)


async def reapply_routes(db_engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession], caddy: CaddyClient) -> int:
    """Put back every route Caddy lost (after a restart, say); returns how many were applied.

    A project whose deployment holds its lock is skipped: that deployment applies its own route.
    """
    async with sessionmaker() as session:
        rows = (await session.execute(select(ProxyRoute, Project.name).join(Project))).all()

    applied = 0
    for route, project in rows:
        try:
            if await caddy.get_upstreams(route.route_id) is not None:
                continue
            async with try_project_lock(db_engine, route.project_id) as locked:
                if not locked:
                    continue
                async with sessionmaker() as session:
                    fresh = await session.get(ProxyRoute, route.project_id)
                if fresh is not None:
                    await caddy.apply_route(fresh.route_id, list(fresh.hosts), list(fresh.upstreams))
                    applied += 1
                    logger.info("route.reapplied", project=project, upstreams=len(fresh.upstreams))
        except CaddyError as error:
            logger.warning("route.reapply_failed", project=project, error=str(error))
    return applied
