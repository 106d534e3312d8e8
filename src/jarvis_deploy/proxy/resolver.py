"""DNS server that answers Caddy's upstream lookups with the addresses stored for each project's route.

It reads the database on every A query, so the answer changes as soon as a switch commits. When
the database fails it returns the last answer it gave for the name, so Caddy keeps routing to
the live containers through a database outage; it retries the database after RETRY_SECONDS.
"""

import asyncio
import time

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jarvis_deploy.db.models import Project, ProxyRoute
from jarvis_deploy.proxy.lookup import ZONE, common_port, parse_lookup_name

logger = structlog.get_logger(__name__)

# Caddy holds one lock for all its A lookups while it waits for an answer, so a slow database
# must not delay every answer: a query gives up on it after DATABASE_TIMEOUT seconds.
DATABASE_TIMEOUT = 0.5
RETRY_SECONDS = 1.0


class UpstreamTable:
    """Addresses of each project's live upstreams, read from the proxy_routes table."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker
        self._last: dict[tuple[str, int], list[str] | None] = {}
        self._retry_at = 0.0

    async def addresses(self, project: str, port: int) -> list[str] | None:
        """Return the IPv4 addresses of the project's upstreams on `port`, or None when it has none there.

        Raises LookupError when the database fails and no earlier answer for the name exists.
        """
        key = (project, port)
        if time.monotonic() < self._retry_at:
            return self._cached(key)

        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                upstreams = await self._read(project)
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            logger.warning("resolver.database_failed", project=project, error=repr(error), retry_seconds=RETRY_SECONDS)
            return self._cached(key)

        addresses = None
        if upstreams and common_port(upstreams) == port:
            addresses = sorted(upstream.rpartition(":")[0] for upstream in upstreams)
        self._last[key] = addresses
        return addresses

    def _cached(self, key: tuple[str, int]) -> list[str] | None:
        if key not in self._last:
            raise LookupError(f"database unavailable and no earlier response for project {key[0]!r} on port {key[1]}")
        return self._last[key]

    async def _read(self, project: str) -> list[str] | None:
        async with self.sessionmaker() as session:
            statement = select(ProxyRoute.upstreams).join(Project).where(Project.name == project)
            return (await session.execute(statement)).scalar_one_or_none()


async def answer(table: UpstreamTable, instance: str, wire: bytes) -> bytes | None:
    """Build the response to one DNS query, or return None for a message that is not a query.

    Names of another service `instance` get NXDOMAIN, since this database has no routes of theirs.
    """
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    if query.flags & dns.flags.QR:
        return None

    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response.to_wire()
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()

    question = query.question[0]
    parsed = parse_lookup_name(question.name.to_text())
    if parsed is None:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.REFUSED)
        return response.to_wire()
    if question.rdtype != dns.rdatatype.A:
        # Upstreams are IPv4 addresses only, so every other type has no records (NODATA).
        return response.to_wire()

    project, port, name_instance = parsed
    if name_instance != instance:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    try:
        addresses = await table.addresses(project, port)
    except LookupError as error:
        logger.warning("resolver.no_answer", name=question.name.to_text(), error=str(error))
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()
    if addresses is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    # TTL 0, because Caddy's own refresh interval decides how long the answer is used.
    response.answer.append(dns.rrset.from_text_list(question.name, 0, "IN", "A", addresses))
    return response.to_wire()


class ResolverProtocol(asyncio.DatagramProtocol):
    def __init__(self, table: UpstreamTable, instance: str) -> None:
        self.table = table
        self.instance = instance
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, address: tuple) -> None:
        task = asyncio.create_task(self._respond(data, address))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _respond(self, data: bytes, address: tuple) -> None:
        response = await answer(self.table, self.instance, data)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, address)


async def serve(sessionmaker: async_sessionmaker[AsyncSession], instance: str, host: str, port: int) -> None:
    """Answer the lookups of service `instance` on UDP `host:port` until cancelled."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ResolverProtocol(UpstreamTable(sessionmaker), instance), local_addr=(host, port)
    )
    logger.info("resolver.started", address=f"{host}:{port}", zone=ZONE, instance=instance)
    try:
        await asyncio.Future()
    finally:
        transport.close()
        logger.info("resolver.stopped", address=f"{host}:{port}")
