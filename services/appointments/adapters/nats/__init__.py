"""NATS JetStream adapters: stream definitions and their create-or-update from code."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task was asked to cancel.

    nats-py swallows a cancellation at some await points (flushing a publish) and turns it
    into ``TooManyStalledMsgsError`` at others; a loop that catches ``Exception`` to ride
    out outages calls this so that it still stops when its task is cancelled.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
