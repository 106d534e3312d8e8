"""Per-project Postgres advisory locks, held on a connection of their own.

A lock goes away with its connection, so a worker that dies releases the projects it held.
"""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

_LOCK = text("SELECT pg_advisory_lock(hashtextextended(:key, 0))")
_TRY_LOCK = text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))")
_UNLOCK = text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))")


@asynccontextmanager
async def project_lock(db_engine: AsyncEngine, project_id: uuid.UUID) -> AsyncIterator[None]:
    """Wait for the project's lock and hold it inside the block."""
    async with db_engine.connect() as connection:
        key = {"key": str(project_id)}
        await connection.execute(_LOCK, key)
        await connection.commit()
        try:
            yield
        finally:
            await connection.execute(_UNLOCK, key)
            await connection.commit()


@asynccontextmanager
async def try_project_lock(db_engine: AsyncEngine, project_id: uuid.UUID) -> AsyncIterator[bool]:
    """Take the project's lock if it is free; the block gets whether it was taken."""
    async with db_engine.connect() as connection:
        key = {"key": str(project_id)}
        locked = bool(await connection.scalar(_TRY_LOCK, key))
        await connection.commit()
        try:
            yield locked
        finally:
            if locked:
                await connection.execute(_UNLOCK, key)
                await connection.commit()
