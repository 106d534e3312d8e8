"""A hand-back clean-up runs to its end even when the worker's task is cancelled again."""

import asyncio
from types import SimpleNamespace

import pytest

from jarvis_deploy.deployments.runner import _finish_despite_cancellation


async def test_cleanup_finishes_through_repeated_cancellation() -> None:
    finished = asyncio.Event()

    async def cleanup() -> None:
        await asyncio.sleep(0.2)
        finished.set()

    async def job() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await _finish_despite_cancellation(context, cleanup())
            raise

    context = SimpleNamespace(cleanups=set())
    task = asyncio.create_task(job())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()
    assert context.cleanups == set()


async def test_cleanup_error_is_raised() -> None:
    async def cleanup() -> None:
        raise RuntimeError("clean-up failed")

    with pytest.raises(RuntimeError, match="clean-up failed"):
        await _finish_despite_cancellation(SimpleNamespace(cleanups=set()), cleanup())
