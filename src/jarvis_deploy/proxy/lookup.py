"""DNS names under which Caddy looks up a project's upstream addresses, and a client for those lookups.

With an upstream resolver, a route's upstreams are not listed in Caddy's configuration. The route
names an A lookup instead, `<project>.p<port>.<instance>.upstreams.jarvis.internal.`, and Caddy's
`a` upstream source (Caddy 2.6) sends it to `jarvis-deploy resolver`, which returns the addresses
stored for the project's route. A switch then changes only the stored addresses, and Caddy, which caches
the answer for `refresh`, sends new requests to the new containers without reloading.
"""

import asyncio
import ipaddress
import time
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from jarvis_deploy.config import parse_host_port

# `.internal` is reserved for private use (ICANN, 2024), so no public name can collide with these.
ZONE = "upstreams.jarvis.internal."
# PostgreSQL NOTIFY channel on which a committed change of a project's upstreams is announced.
UPSTREAMS_CHANNEL = "jarvis_upstreams"


class ResolverUnavailable(Exception):
    """The upstream resolver did not return the expected addresses in time."""


def lookup_name(project: str, port: int, instance: str) -> str:
    """Return the name Caddy looks up for the project's upstreams on `port`.

    The name carries the service instance because Caddy 2.6 caches A lookups by name and port alone,
    across routes, so two instances behind one Caddy must not share a name.
    """
    return f"{project}.p{port}.{instance}.{ZONE}"


def parse_lookup_name(name: str) -> tuple[str, int, str] | None:
    """Return the project, port and instance of a lookup name, or None for a name outside the zone."""
    name = name.lower()
    if not name.endswith("." + ZONE):
        return None
    labels = name[: -len(ZONE) - 1].split(".")
    if len(labels) != 3 or not labels[1].startswith("p") or not labels[1][1:].isdigit():
        return None
    project, port_label, instance = labels
    port = int(port_label[1:])
    if not project or not instance or not 0 < port < 65536:
        return None
    return project, port, instance


def common_port(upstreams: list[str]) -> int | None:
    """Return the port of `upstreams` when all are IPv4 addresses on that one port, else None.

    Only such a set fits an A lookup, whose answer carries addresses and no ports.
    """
    ports = set()
    for upstream in upstreams:
        host, _, port = upstream.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return None
        if not port.isdigit():
            return None
        ports.add(int(port))
    if len(ports) != 1:
        return None
    return ports.pop()


def upstream_hosts(upstreams: list[str]) -> list[str]:
    """Return the hosts of `host:port` upstreams, sorted, as an A lookup returns them."""
    return sorted(upstream.rpartition(":")[0] for upstream in upstreams)


@dataclass(frozen=True)
class UpstreamLookup:
    """Caddy's `a` upstream source for one route: the name, the port, the cache time and the resolver."""

    name: str
    port: int
    refresh: float
    resolver: str

    def caddy_json(self) -> dict[str, Any]:
        host, port = parse_host_port(self.resolver, "upstream_resolver")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return {
            "source": "a",
            "name": self.name,
            "port": str(self.port),
            "refresh": f"{round(self.refresh * 1000)}ms",
            "resolver": {"addresses": [f"udp/{address}"]},
        }


async def query_addresses(resolver: str, name: str, timeout: float = 1.0) -> list[str] | None:
    """Ask the resolver for the A records of `name`; returns None when the name does not exist."""
    host, port = parse_host_port(resolver, "upstream_resolver")
    query = dns.message.make_query(name, dns.rdatatype.A)
    try:
        response = await dns.asyncquery.udp(query, host, port=port, timeout=timeout)
    except (dns.exception.Timeout, OSError) as error:
        raise ResolverUnavailable(
            f"upstream resolver at {resolver} did not respond to the query for {name} ({error!r}). Check that"
            " `jarvis-deploy resolver` runs on that address"
        ) from error
    if response.rcode() == dns.rcode.NXDOMAIN:
        return None
    if response.rcode() != dns.rcode.NOERROR:
        raise ResolverUnavailable(
            f"upstream resolver at {resolver} returned {dns.rcode.to_text(response.rcode())} for {name}"
        )
    return sorted(item.address for rrset in response.answer for item in rrset if rrset.rdtype == dns.rdatatype.A)


async def wait_for_addresses(resolver: str, name: str, addresses: list[str], timeout: float) -> None:
    """Wait until the resolver returns exactly `addresses` for `name`, raising ResolverUnavailable after `timeout`."""
    expected = sorted(addresses)
    deadline = time.monotonic() + timeout
    last = "no response"
    while True:
        try:
            result = await query_addresses(resolver, name, timeout=min(1.0, timeout))
            if result == expected:
                return
            last = "NXDOMAIN" if result is None else str(result)
        except ResolverUnavailable:
            last = "no response"
        if time.monotonic() > deadline:
            raise ResolverUnavailable(
                f"upstream resolver at {resolver} did not return {expected} for {name} within {timeout:g}s"
                f" (last result: {last}). Check that `jarvis-deploy resolver` runs on that address with the"
                " same database"
            )
        await asyncio.sleep(0.005)
