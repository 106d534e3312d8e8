"""DNS server that returns the addresses stored for each project's route to Caddy's upstream lookups.

It keeps every route's upstreams in memory and responds from there, because Caddy holds one lock
over all its A lookups while it waits for a response. The table is read again from the database
whenever a switch commits (PostgreSQL NOTIFY on UPSTREAMS_CHANNEL) and every RELOAD_SECONDS in
case a notification was missed. While the database is down, the last table read stays in use, so
Caddy keeps routing to the live containers.
"""

import asyncio
import contextlib
import json

import asyncpg
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import structlog
from sqlalchemy.engine import make_url

from jarvis_deploy.proxy.lookup import (
    UPSTREAMS_CHANNEL,
    ZONE,
    common_port,
    parse_lookup_name,
    upstream_hosts,
)

logger = structlog.get_logger(__name__)

RELOAD_SECONDS = 1.0
# Seconds to wait before connecting again after the database connection failed.
RECONNECT_SECONDS = 1.0
ROUTES_QUERY = "SELECT p.name, r.upstreams FROM proxy_routes r JOIN projects p ON p.id = r.project_id"


class UpstreamTable:
    """Upstreams of every project's route, by project name, as last read from the database."""

    def __init__(self) -> None:
        self._routes: dict[str, list[str]] | None = None

    @property
    def loaded(self) -> bool:
        return self._routes is not None

    @property
    def route_count(self) -> int:
        return len(self._routes or {})

    def replace(self, routes: dict[str, list[str]]) -> None:
        self._routes = routes

    def addresses(self, project: str, port: int) -> list[str] | None:
        """Return the IPv4 addresses of the project's upstreams on `port`, or None when it has none there.

        Raises LookupError before the first successful read of the database.
        """
        if self._routes is None:
            raise LookupError("the upstream table has not been read from the database yet")
        upstreams = self._routes.get(project)
        if not upstreams or common_port(upstreams) != port:
            return None
        return upstream_hosts(upstreams)

    async def reload(self, connection: asyncpg.Connection) -> None:
        rows = await connection.fetch(ROUTES_QUERY)
        # asyncpg returns jsonb as text, since no codec is set on the connection.
        self.replace({row["name"]: json.loads(row["upstreams"]) for row in rows})


def answer(table: UpstreamTable, instance: str, wire: bytes) -> bytes | None:
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
    project, port, name_instance = parsed
    if name_instance != instance:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
    if question.rdtype != dns.rdatatype.A:
        # Upstreams are IPv4 addresses only, so every other type has no records (NODATA).
        return response.to_wire()

    try:
        addresses = table.addresses(project, port)
    except LookupError as error:
        logger.warning("resolver.no_table", name=question.name.to_text(), error=str(error))
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()
    if addresses is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    # TTL 0, because Caddy's own refresh interval decides how long the addresses are used.
    response.answer.append(dns.rrset.from_text_list(question.name, 0, "IN", "A", addresses))
    return response.to_wire()


class ResolverProtocol(asyncio.DatagramProtocol):
    def __init__(self, table: UpstreamTable, instance: str) -> None:
        self.table = table
        self.instance = instance
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, address: tuple) -> None:
        response = answer(self.table, self.instance, data)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, address)


async def follow_routes(table: UpstreamTable, database_url: str, reload_seconds: float = RELOAD_SECONDS) -> None:
    """Keep `table` equal to the proxy_routes table: read it on every notification and every `reload_seconds`."""
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    changed = asyncio.Event()
    failing = False

    while True:
        connection: asyncpg.Connection | None = None
        try:
            connection = await asyncpg.connect(dsn, timeout=5)
            await connection.add_listener(UPSTREAMS_CHANNEL, lambda *_: changed.set())
            while True:
                changed.clear()
                await table.reload(connection)
                if failing:
                    logger.info("resolver.database_back", routes=table.route_count)
                    failing = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), reload_seconds)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            if not failing:
                logger.warning(
                    "resolver.database_failed", error=repr(error), loaded=table.loaded, retry_seconds=RECONNECT_SECONDS
                )
            failing = True
        finally:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close(timeout=1)
        await asyncio.sleep(RECONNECT_SECONDS)


async def serve(database_url: str, instance: str, host: str, port: int) -> None:
    """Serve the lookups of service `instance` on UDP `host:port` until cancelled."""
    table = UpstreamTable()
    follower = asyncio.create_task(follow_routes(table, database_url))
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ResolverProtocol(table, instance), local_addr=(host, port)
    )
    logger.info("resolver.started", address=f"{host}:{port}", zone=ZONE, instance=instance)
    try:
        await asyncio.Future()
    finally:
        transport.close()
        follower.cancel()
        logger.info("resolver.stopped", address=f"{host}:{port}")
