"""The one wait of the services' loops: a pause that a stop (or a wake-up) cuts short."""

from __future__ import annotations

import asyncio


async def idle(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Wait ``seconds``, or less if ``stop`` (or ``wake``) is set, leaving no task behind;
    whether ``stop`` is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return stop.is_set()
