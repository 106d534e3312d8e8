"""Project routes: the database stores each project's desired route, and the worker makes Caddy match it."""

import asyncio
import time
import uuid

import structlog
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jarvis_deploy.db.locks import try_project_lock
from jarvis_deploy.db.models import Project, ProxyRoute
from jarvis_deploy.proxy.caddy import (
    CaddyClient,
    CaddyError,
    RouteNotFound,
    build_route,
    route_id,
)
from jarvis_deploy.proxy.lookup import (
    UPSTREAMS_CHANNEL,
    ResolverUnavailable,
    UpstreamLookup,
    common_port,
    lookup_name,
    upstream_hosts,
    wait_for_addresses,
)

logger = structlog.get_logger(__name__)

# Seconds a switch waits for the upstream resolver to return the new addresses.
RESOLVER_WAIT_SECONDS = 5.0


class TrafficRouter:
    """Points a project's domains at a set of upstreams: first in the database, then in Caddy."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        caddy: CaddyClient | None,
        resolver: str = "",
        lookup_refresh: float = 0.01,
        instance: str = "",
    ) -> None:
        self.sessionmaker = sessionmaker
        self.caddy = caddy
        self.resolver = resolver
        self.lookup_refresh = lookup_refresh
        self.instance = instance

    def lookup_for(self, project: str, upstreams: list[str]) -> UpstreamLookup | None:
        """Return the lookup that finds `upstreams`, or None when they need a static list.

        A lookup needs the upstream resolver and upstreams that are IPv4 addresses on one port.
        """
        port = common_port(upstreams) if self.resolver else None
        if port is None:
            return None
        return UpstreamLookup(lookup_name(project, port, self.instance), port, self.lookup_refresh, self.resolver)

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
        lookup = self.lookup_for(project, upstreams)
        async with self.sessionmaker() as session:
            previous = await session.get(ProxyRoute, project_id)
            hosts_changed = previous is None or list(previous.hosts) != hosts
            # A route that Caddy resolves through a lookup has no upstream list for a PATCH to replace.
            was_looked_up = previous is not None and self.lookup_for(project, list(previous.upstreams)) is not None
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
            await notify_resolvers(session, project)
            await session.commit()

        if self.caddy is not None and lookup is not None:
            await self._switch_lookup(identifier, hosts, upstreams, lookup)
        elif self.caddy is not None and (hosts_changed or was_looked_up):
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

    async def _switch_lookup(self, identifier: str, hosts: list[str], upstreams: list[str], lookup: UpstreamLookup) -> None:
        """Make Caddy's route name the lookup, wait until the resolver returns `upstreams`, then until Caddy's cache expired.

        The stored upstreams were committed before, so the resolver already returns them. Caddy
        reloads only when the route itself changes (new hosts, a new port, Caddy lost it).
        """
        assert self.caddy is not None
        expected = build_route(identifier, hosts, upstreams, lookup)
        current = await self.caddy.get_route(identifier)
        if current is None or current.get("match") != expected["match"] or current.get("handle") != expected["handle"]:
            await self.caddy.apply_route(identifier, hosts, upstreams, lookup)

        try:
            await wait_for_addresses(self.resolver, lookup.name, upstream_hosts(upstreams), RESOLVER_WAIT_SECONDS)
        except ResolverUnavailable as error:
            raise CaddyError(str(error)) from error
        # Caddy caches the earlier addresses for up to `refresh`; after that every new request gets these.
        await asyncio.sleep(lookup.refresh)

    async def route_of(self, project_id: uuid.UUID) -> ProxyRoute | None:
        async with self.sessionmaker() as session:
            return await session.get(ProxyRoute, project_id)

    async def remove(self, project_id: uuid.UUID, project: str) -> None:
        """Delete the project's route, so no request reaches containers that are going away."""
        async with self.sessionmaker() as session:
            await session.execute(delete(ProxyRoute).where(ProxyRoute.project_id == project_id))
            await notify_resolvers(session, project)
            await session.commit()
        if self.caddy is not None:
            await self.caddy.delete_route(route_id(project))
        logger.info("route.removed", project=project)


async def notify_resolvers(session: AsyncSession, project: str) -> None:
    """Tell upstream resolvers that the project's upstreams change when this transaction commits."""
    await session.execute(select(func.pg_notify(UPSTREAMS_CHANNEL, project)))


async def reapply_routes(db_engine: AsyncEngine, router: TrafficRouter) -> int:
    """Put back every route Caddy lost (after a restart, say); returns how many were applied.

    A project whose deployment holds its lock is skipped: that deployment applies its own route.
    """
    sessionmaker, caddy = router.sessionmaker, router.caddy
    assert caddy is not None
    async with sessionmaker() as session:
        rows = (await session.execute(select(ProxyRoute, Project.name).join(Project))).all()

    applied = 0
    for route, project in rows:
        try:
            if await caddy.get_route(route.route_id) is not None:
                continue
            async with try_project_lock(db_engine, route.project_id) as locked:
                if not locked:
                    continue
                async with sessionmaker() as session:
                    fresh = await session.get(ProxyRoute, route.project_id)
                if fresh is not None:
                    upstreams = list(fresh.upstreams)
                    lookup = router.lookup_for(project, upstreams)
                    await caddy.apply_route(fresh.route_id, list(fresh.hosts), upstreams, lookup)
                    applied += 1
                    logger.info("route.reapplied", project=project, upstreams=len(fresh.upstreams))
        except CaddyError as error:
            logger.warning("route.reapply_failed", project=project, error=str(error))
    return applied
