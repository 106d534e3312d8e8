"""Loopback addresses for routed containers, one per container, so every upstream of a project shares its port."""

import ipaddress

from sqlalchemy import Sequence
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

UPSTREAM_ADDRESS_SEQUENCE = Sequence("upstream_address_seq")
# Sequence numbers tried for one container before the range counts as full.
MAX_ATTEMPTS = 1000


def address_at(network: str, number: int) -> str:
    """Return the `number`-th address (from 1) of the network's host addresses, starting over after the last."""
    hosts = ipaddress.IPv4Network(network)
    usable = hosts.num_addresses - 2
    return str(hosts.network_address + 1 + (number - 1) % usable)


async def next_upstream_address(
    sessionmaker: async_sessionmaker[AsyncSession], network: str, in_use: set[str]
) -> str | None:
    """Take the next address of `network` that is not `in_use`, or None when all of them are.

    A database sequence numbers the addresses, so concurrent workers of one service never take the
    same one. `in_use` contains what other containers on the Docker host publish on, including those of
    other services and of addresses that came round again after the sequence wrapped.
    NOTE: two services sharing a range could still take one address at the same moment; the second
    container's start then fails with "port is already allocated".
    """
    usable = ipaddress.IPv4Network(network).num_addresses - 2
    async with sessionmaker() as session:
        for _ in range(min(usable, MAX_ATTEMPTS)):
            number = await session.scalar(UPSTREAM_ADDRESS_SEQUENCE.next_value())
            address = address_at(network, number)
            if address not in in_use:
                return address
    return None
