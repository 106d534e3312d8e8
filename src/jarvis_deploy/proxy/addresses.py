"""Loopback addresses for routed containers, one per container, so every upstream of a project shares its port."""

import ipaddress

from sqlalchemy import Sequence
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

UPSTREAM_ADDRESS_SEQUENCE = Sequence("upstream_address_seq")


def address_at(network: str, number: int) -> str:
    """Return the `number`-th address (from 1) of the network's host addresses, starting over after the last."""
    hosts = ipaddress.IPv4Network(network)
    usable = hosts.num_addresses - 2
    return str(hosts.network_address + 1 + (number - 1) % usable)


async def next_upstream_address(sessionmaker: async_sessionmaker[AsyncSession], network: str) -> str:
    """Take the next address of `network` from a database sequence, so concurrent workers never share one.

    NOTE: after the network's last address the numbering starts over, so a container that outlives as
    many newer routed containers as the network has addresses would share its address with a new one,
    and that container's start fails with "port is already allocated".
    """
    async with sessionmaker() as session:
        number = await session.scalar(UPSTREAM_ADDRESS_SEQUENCE.next_value())
    return address_at(network, number)
