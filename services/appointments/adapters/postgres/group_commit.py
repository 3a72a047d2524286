"""Group commit: concurrent writes coalesced into one statement (one round trip, one commit).

A write waits only for a statement already in flight: the first write of an idle store
is sent at once, alone; the writes that queue while statements are in flight go together
in the next one (no timer fills a batch). At most ``in_flight`` statements run at a time,
each of at most ``max_batch`` writes, and writes with the same ``key`` never share a
batch or run concurrently (the later one waits for the next batch, or, while its batch is
sent again one by one, until the earlier one is answered).

A batch the database refuses as a whole (:class:`DecideEach`: a constraint one of its
writes broke, a deadlock...) is sent again so that each write gets its own answer: the
writes the refusal does not name together (refused again: one by one), then those it
names (``implicated``: a taken key or slot that they hold) one by one, in order; a refusal
that names none sends every write one by one, in order. Two of those in a row given up on
(each waited out a lock or statement timeout) send the rest together once: through if they
wait on nothing (the two waited on one held slot), else a stall, whose answer is theirs.
One bad write among many then costs two statements more, not one per write; many cost
about one each, as before. Any other failure of a batch (the database unreachable) is every
write's answer. A caller cancelled while its batch is in flight leaves the batch alone;
every other caller gets a result or an exception, never silence.

A write still queued ``queue_timeout`` seconds after it came (the statements in flight
held by a database that stopped answering, each until its own timeout) is answered
:class:`~services.appointments.service_layer.ports.NotSent` (a ``503``) and never
sent: its caller learns at once, and for certain, that nothing was written, instead of
waiting for statements that may take tens of seconds to give up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.appointments.service_layer.ports import NotSent, StatementGaveUp
from services.errors import Unavailable

_NOT_TAKEN = "The database did not take the write in time; nothing was written."

Item = TypeVar("Item")
Result = TypeVar("Result")


class DecideEach(Exception):
    """Raised by a batch sender: the batch failed as a whole because of what (some of)
    its writes are; send them one by one for their own answers."""


@dataclass(eq=False)
class _Waiter(Generic[Item, Result]):
    item: Item
    key: Hashable
    future: asyncio.Future[Result] = field(repr=False)
    queued_at: float = 0.0
    """The event loop's time when it came."""
    released: bool = False
    """Its key is free again (its statement is over, or it will not be sent)."""


class GroupCommit(Generic[Item, Result]):
    """Sends ``submit``-ted items through ``send_batch`` (several) or ``send_one`` (one)."""

    def __init__(
        self,
        send_batch: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        send_one: Callable[[Item], Awaitable[Result]],
        key: Callable[[Item], Hashable],
        *,
        implicated: Callable[[Item, BaseException], bool] | None = None,
        in_flight: int = 2,
        max_batch: int = 128,
        queue_timeout: float | None = None,
    ) -> None:
        """``implicated(item, cause)``: whether the cause of a :class:`DecideEach` (the
        database's refusal) names ``item``, which is then sent alone. ``queue_timeout``:
        how long a write may wait for its turn (None: as long as it takes)."""
        if in_flight < 1 or max_batch < 1:
            raise ValueError("in_flight and max_batch must be at least 1")
        self._queue_timeout = queue_timeout
        self._expiry: asyncio.TimerHandle | None = None  # of the oldest queued write
        self._send_batch = send_batch
        self._send_one = send_one
        self._key = key
        self._implicated = implicated
        self._in_flight = in_flight
        self._max_batch = max_batch
        self._pending: deque[_Waiter[Item, Result]] = deque()
        self._busy: set[Hashable] = set()  # keys of the writes in flight
        self._senders = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references

    async def submit(self, item: Item) -> Result:
        """The answer to ``item``, once its batch (or its own statement) is through."""
        loop = asyncio.get_running_loop()
        waiter: _Waiter[Item, Result] = _Waiter(item, self._key(item), loop.create_future())
        if self._queue_timeout is not None:
            waiter.queued_at = loop.time()
            if self._expiry is None:
                self._expiry = loop.call_at(waiter.queued_at + self._queue_timeout, self._expire)
        self._pending.append(waiter)
        self._more_senders()
        # Cancelling the caller cancels only its future: the sender task runs on.
        return await waiter.future

    def _more_senders(self) -> None:
        """A sender for the queued writes, if fewer than ``in_flight`` run."""
        if self._pending and self._senders < self._in_flight:
            self._senders += 1
            ran: list[bool] = []
            task = asyncio.get_running_loop().create_task(self._send_pending(ran))
            self._tasks.add(task)
            task.add_done_callback(lambda task: self._sender_gone(task, ran))

    def _sender_gone(self, task: asyncio.Task[None], ran: list[bool]) -> None:
        self._tasks.discard(task)
        if not ran:  # cancelled before its first step: its body (and finally) never ran
            self._sender_stopped()

    def _sender_stopped(self) -> None:
        self._senders -= 1
        if self._senders == 0:  # only on cancellation: nobody would send these
            while self._pending:
                self._pending.popleft().future.cancel()

    def _release(self, waiter: _Waiter[Item, Result], *, more: bool = True) -> None:
        """``waiter``'s key free again, once its statement is over (or it will not be
        sent): the next write of that key may go, in another statement, while the rest of
        this batch is still sent one by one (each perhaps waiting out a lock timeout)."""
        if waiter.released:
            return
        waiter.released = True
        self._busy.discard(waiter.key)
        if more:
            self._more_senders()

    def _expire(self) -> None:
        """Answer the writes queued ``queue_timeout`` ago and not taken yet (the oldest come
        first in the queue: taking keeps their order) ``503``, never to be sent;
        then look again when the oldest left is due."""
        assert self._queue_timeout is not None
        self._expiry = None
        loop = asyncio.get_running_loop()
        expired_before = loop.time() - self._queue_timeout
        while self._pending and (
            self._pending[0].future.done() or self._pending[0].queued_at <= expired_before
        ):
            # Not the database's failure (it may only be slow): as for a statement it gave
            # up on, nothing that cached states rely on is in doubt.
            _fail(self._pending.popleft(), NotSent(_NOT_TAKEN))
        if self._pending:
            due = self._pending[0].queued_at + self._queue_timeout
            self._expiry = loop.call_at(due, self._expire)

    async def _send_pending(self, ran: list[bool]) -> None:
        ran.append(True)
        try:
            while batch := self._take():
                try:
                    await self._send(batch)
                except BaseException:  # cancelled (shutdown): start no other sender
                    for waiter in batch:
                        self._release(waiter, more=False)
                    raise
                for waiter in batch:
                    self._release(waiter)
        finally:
            self._sender_stopped()

    def _take(self) -> list[_Waiter[Item, Result]]:
        """The next batch, in arrival order; callers that gave up are dropped."""
        batch: list[_Waiter[Item, Result]] = []
        keys: set[Hashable] = set()
        left: deque[_Waiter[Item, Result]] = deque()
        while self._pending and len(batch) < self._max_batch:
            waiter = self._pending.popleft()
            if waiter.future.done():
                continue
            if waiter.key in self._busy or waiter.key in keys:
                left.append(waiter)
            else:
                keys.add(waiter.key)
                batch.append(waiter)  # on its way: its statement's own timeout applies
        left.extend(self._pending)
        self._pending = left
        self._busy |= keys
        return batch

    async def _send(self, batch: list[_Waiter[Item, Result]]) -> None:
        try:
            if len(batch) == 1:
                results: Sequence[Result] = [await self._send_one(batch[0].item)]
            else:
                results = await self._send_batch([w.item for w in batch])
        except DecideEach as refusal:
            await self._send_apart(batch, refusal.__cause__)
        except BaseException as exc:
            for waiter in batch:
                _fail(waiter, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for waiter, result in zip(batch, results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(result)

    async def _send_apart(
        self, batch: list[_Waiter[Item, Result]], cause: BaseException | None
    ) -> None:
        """A refused batch again: the writes its refusal does not name together (one by
        one if refused again), then those it names alone. Each gets its own answer."""
        try:
            await self._send_rest_then_named(batch, cause)
        except BaseException as exc:  # the sender cancelled (shutdown): nobody is left waiting
            for waiter in batch:
                _fail(waiter, exc)
            raise

    async def _send_rest_then_named(
        self, batch: list[_Waiter[Item, Result]], cause: BaseException | None
    ) -> None:
        batch = [w for w in batch if not w.future.done()]  # callers that gave up
        named = [w for w in batch if cause is not None and self._named(w, cause)]
        if len(batch) < 2 or not named or len(named) == len(batch):
            await self._send_each(batch)
            return
        # The rest first: a cancel among them may free the slot a named booking wants.
        down = await self._send_together([w for w in batch if w not in named])
        if down is not None:  # unreachable: the named only fail the same
            for waiter in named:
                _fail(waiter, down)
            return
        await self._send_each(named)

    async def _send_together(
        self, batch: list[_Waiter[Item, Result]], *, after_two: bool = False
    ) -> BaseException | None:
        """``batch`` in one statement, or one by one if refused again (many bad writes,
        retries after an outage say: one by one costs the least statements then); the
        failure that made the database unreachable, if one did.

        ``after_two``: the rest of a batch sent one by one, after two writes in a row the
        database gave up on: a stall (a locked table, every write waiting out its
        timeout), or two writes waiting on one lock (two bookings of a slot another
        transaction holds). Through if they wait on nothing; given up on too, a stall,
        whose answer is theirs (and returned) instead of each waiting out its own timeout;
        refused for what they hold, one by one without coming back here."""
        if len(batch) < 2:
            return await self._send_each(batch, together_after_two=not after_two)
        try:
            results = await self._send_batch([w.item for w in batch])
        except DecideEach as refusal:
            stall = refusal.__cause__
            if after_two and isinstance(stall, StatementGaveUp):
                for waiter in batch:
                    self._refuse(waiter, stall)
                return stall
            return await self._send_each(batch, together_after_two=not after_two)
        except Exception as exc:
            for waiter in batch:
                self._refuse(waiter, exc)
            return exc if _database_down(exc) else None
        for waiter, result in zip(batch, results, strict=True):
            self._succeed(waiter, result)
        return None

    def _named(self, waiter: _Waiter[Item, Result], cause: BaseException) -> bool:
        return self._implicated is not None and self._implicated(waiter.item, cause)

    async def _send_each(
        self, batch: list[_Waiter[Item, Result]], *, together_after_two: bool = True
    ) -> BaseException | None:
        """Each write on its own, in order (the first one wins); the failure that made the
        database unreachable, if one did (the writes after it got that answer too)."""
        down: BaseException | None = None
        gave_up = 0  # statements in a row the database gave up on (a timeout, say)
        for position, waiter in enumerate(batch):
            if waiter.future.done():  # its caller gave up; the batch wrote nothing
                self._release(waiter)
                continue
            if down is not None:
                self._refuse(waiter, down)
                continue
            try:
                result = await self._send_one(waiter.item)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # the sender cancelled (shutdown)
                    for rest in batch:
                        _fail(rest, exc)
                    raise
                self._refuse(waiter, exc)
                gave_up = gave_up + 1 if isinstance(exc, StatementGaveUp) else 0
                if gave_up >= 2 and together_after_two:
                    # (None left: the writes a refusal named, which come after, are still
                    # tried alone.)
                    left = [w for w in batch[position + 1 :] if not w.future.done()]
                    return await self._send_together(left, after_two=True)
                if _database_down(exc) or gave_up >= 2:
                    # The rest would only wait for the same answer (a stall: the second
                    # timeout in a row, not one per write).
                    down = exc
            else:
                gave_up = 0
                self._succeed(waiter, result)
        return down

    def _succeed(self, waiter: _Waiter[Item, Result], result: Result) -> None:
        """Answer ``waiter`` with ``result``, its statement over: its key is free again."""
        if not waiter.future.done():
            waiter.future.set_result(result)
        self._release(waiter)

    def _refuse(self, waiter: _Waiter[Item, Result], exc: BaseException) -> None:
        """Answer ``waiter`` with ``exc``, its statement over (or never to be sent): its
        key is free again."""
        _fail(waiter, exc)
        self._release(waiter)


def _database_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is unreachable, not that it refused one statement."""
    return isinstance(exc, Unavailable) and not isinstance(exc, StatementGaveUp)


def _fail(waiter: _Waiter[Item, Result], exc: BaseException) -> None:
    if waiter.future.done():
        return
    if isinstance(exc, Exception):
        waiter.future.set_exception(exc)
    else:  # the sender task itself was cancelled (shutdown)
        waiter.future.cancel()
