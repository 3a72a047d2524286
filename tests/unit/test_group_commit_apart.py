"""Group commit with a fake database: its limits (statements in flight, one write of a key
at a time), and its answer to a refused batch: the rest together again, the writes the
refusal names alone; an outage meanwhile is everybody's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from services.appointments.adapters.postgres.group_commit import DecideEach, GroupCommit
from services.appointments.service_layer.ports import StatementGaveUp
from services.errors import Unavailable


class Refused(Exception):
    """The database's refusal of a batch, naming the bad writes."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(f"refused: {sorted(names)}")
        self.names = names


class Bad(Exception):
    """A write's own refusal."""


class FakeDatabase:
    """Writes named ``bad*`` are refused; ``down`` makes every statement fail."""

    def __init__(self) -> None:
        self.statements: list[list[str]] = []
        self.down_after: int | None = None

    def _statement(self, items: Sequence[str]) -> None:
        self.statements.append(list(items))
        if self.down_after is not None and len(self.statements) > self.down_after:
            raise Unavailable("down")

    async def send_batch(self, items: Sequence[str]) -> list[str]:
        await asyncio.sleep(0)
        self._statement(items)
        bad = {item for item in items if item.startswith("bad")}
        if bad:
            raise DecideEach() from Refused(bad)
        return [f"ok:{item}" for item in items]

    async def send_one(self, item: str) -> str:
        await asyncio.sleep(0)
        self._statement([item])
        if item.startswith("bad"):
            raise Bad(item)
        return f"ok:{item}"


def commit(db: FakeDatabase, *, names: bool = True) -> GroupCommit[str, str]:
    def implicated(item: str, cause: BaseException) -> bool:
        return isinstance(cause, Refused) and item in cause.names

    return GroupCommit(
        db.send_batch,
        db.send_one,
        key=lambda item: item,
        implicated=implicated if names else None,
        in_flight=1,
    )


class Gate(asyncio.Event):
    """A database whose statements answer once the gate is set; notes what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def send_batch(self, items: Sequence[str]) -> list[str]:
        self.sent.extend(items)
        await self.wait()
        return [f"ok:{i}" for i in items]

    async def send_one(self, item: str) -> str:
        return (await self.send_batch([item]))[0]

    def commit(self, queue_timeout: float | None = None) -> GroupCommit[str, str]:
        """Group commit over it, one statement in flight."""
        return GroupCommit(
            self.send_batch,
            self.send_one,
            key=lambda i: i,
            in_flight=1,
            queue_timeout=queue_timeout,
        )


async def _submit_all(group: GroupCommit[str, str], items: list[str]) -> list[object]:
    first = asyncio.ensure_future(group.submit("first"))  # in flight: the rest queue
    await asyncio.sleep(0)
    results = await asyncio.gather(*(group.submit(i) for i in items), return_exceptions=True)
    await first
    return list(results)


async def test_named_writes_go_alone_and_the_rest_together() -> None:
    db = FakeDatabase()
    items = ["a", "b", "bad1", "c", "d", "bad2", "e"]
    results = await _submit_all(commit(db), items)
    assert db.statements[1:] == [items, ["a", "b", "c", "d", "e"], ["bad1"], ["bad2"]]
    assert [r if isinstance(r, str) else type(r).__name__ for r in results] == [
        "ok:a", "ok:b", "Bad", "ok:c", "ok:d", "Bad", "ok:e"
    ]  # fmt: skip


async def test_without_names_every_write_goes_alone_in_order() -> None:
    db = FakeDatabase()
    items = ["a", "bad1", "b"]
    results = await _submit_all(commit(db, names=False), items)
    assert db.statements[1:] == [items, ["a"], ["bad1"], ["b"]]
    assert isinstance(results[1], Bad) and results[0] == "ok:a" and results[2] == "ok:b"


async def test_an_outage_while_the_rest_goes_again_is_the_answer_of_the_named() -> None:
    db = FakeDatabase()
    db.down_after = 2  # the first statement, the batch, then down
    results = await _submit_all(commit(db), ["a", "bad1", "b"])
    assert db.statements[1:] == [["a", "bad1", "b"], ["a", "b"]]
    assert all(isinstance(r, Unavailable) for r in results), results


async def test_a_sender_cancelled_while_sending_apart_leaves_nobody_waiting() -> None:
    db = FakeDatabase()
    group = commit(db)
    release = asyncio.Event()
    send_batch = db.send_batch

    async def hanging_rest(items: Sequence[str]) -> list[str]:
        if list(items) == ["a", "b"]:
            await release.wait()
        return await send_batch(items)

    group._send_batch = hanging_rest  # type: ignore[method-assign]
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(group.submit(i)) for i in ["a", "bad1", "b"]]
    await first
    for _ in range(20):
        await asyncio.sleep(0)
    assert db.statements[-1] == ["a", "bad1", "b"]
    for task in list(group._tasks):
        task.cancel()  # shutdown
    done, pending = await asyncio.wait(waiting, timeout=1)
    assert not pending
    assert all(task.cancelled() for task in done)


@pytest.mark.parametrize("names", [True, False])
async def test_a_caller_that_gave_up_is_not_sent_again(names: bool) -> None:
    db = FakeDatabase()
    group = commit(db, names=names)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(group.submit("c"))
    rest = [asyncio.ensure_future(group.submit(i)) for i in ["a", "bad1"]]
    await asyncio.sleep(0)
    gone.cancel()
    await first
    await asyncio.gather(*rest, return_exceptions=True)
    assert ["c"] not in db.statements and all("c" not in s for s in db.statements[2:])


class Stalled(FakeDatabase):
    """Every statement times out (a table locked by a migration, an I/O stall)."""

    async def send_batch(self, items: Sequence[str]) -> list[str]:
        self._statement(items)
        raise DecideEach() from StatementGaveUp("timeout")

    async def send_one(self, item: str) -> str:
        self._statement([item])
        raise StatementGaveUp("timeout")


async def test_a_stall_costs_a_few_timeouts_not_one_per_write() -> None:
    db = Stalled()
    group = commit(db)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(group.submit(str(i))) for i in range(16)]
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, StatementGaveUp) for r in results)
    # The lone first write, the batch, then two timeouts in a row, the rest together
    # once: given up on too, a stall, they fail with it.
    assert [len(s) for s in db.statements] == [1, 16, 1, 1, 14]


async def test_one_write_that_times_out_fails_alone() -> None:
    db = FakeDatabase()
    send_batch, send_one = db.send_batch, db.send_one

    async def batch(items: Sequence[str]) -> list[str]:
        if "slow" in items:
            db._statement(items)
            raise DecideEach() from StatementGaveUp("lock timeout")
        return await send_batch(items)

    async def one(item: str) -> str:
        if item == "slow":
            db._statement([item])
            raise StatementGaveUp("lock timeout")
        return await send_one(item)

    group = GroupCommit(batch, one, key=lambda item: item, in_flight=1)
    results = await _submit_all(group, ["a", "slow", "b", "c"])
    assert isinstance(results[1], StatementGaveUp)
    assert [results[0], results[2], results[3]] == ["ok:a", "ok:b", "ok:c"]


async def test_two_writes_waiting_on_one_lock_do_not_fail_the_rest() -> None:
    # Two bookings of a slot another transaction holds, side by side: two timeouts in a
    # row, but the rest wait on nothing and pass.
    db = FakeDatabase()
    send_batch, send_one = db.send_batch, db.send_one

    async def batch(items: Sequence[str]) -> list[str]:
        if any(item.startswith("held") for item in items):
            db._statement(items)
            raise DecideEach() from StatementGaveUp("lock timeout")
        return await send_batch(items)

    async def one(item: str) -> str:
        if item.startswith("held"):
            db._statement([item])
            raise StatementGaveUp("lock timeout")
        return await send_one(item)

    group = GroupCommit(batch, one, key=lambda item: item, in_flight=1)
    results = await _submit_all(group, ["held1", "held2", "a", "b", "c"])
    assert isinstance(results[0], StatementGaveUp) and isinstance(results[1], StatementGaveUp)
    assert results[2:] == ["ok:a", "ok:b", "ok:c"]
    assert [len(s) for s in db.statements] == [1, 5, 1, 1, 3]


async def test_named_writes_are_tried_after_two_timeouts_in_the_rest() -> None:
    # The refusal names bad1; the rest (two writes waiting on one held slot) time out
    # together, then each alone: no write is left to tell a stall from a held slot, so
    # bad1, which waits on nothing, is still tried and gets its own answer.
    db = FakeDatabase()

    async def batch(items: Sequence[str]) -> list[str]:
        db._statement(items)
        bad = {item for item in items if item.startswith("bad")}
        raise DecideEach() from (Refused(bad) if bad else StatementGaveUp("lock timeout"))

    async def one(item: str) -> str:
        db._statement([item])
        if item.startswith("bad"):
            raise Bad(item)
        raise StatementGaveUp("lock timeout")

    def implicated(item: str, cause: BaseException) -> bool:
        return isinstance(cause, Refused) and item in cause.names

    group = GroupCommit(batch, one, key=lambda item: item, implicated=implicated, in_flight=1)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    results = await asyncio.gather(
        *(group.submit(i) for i in ["held1", "held2", "bad1"]), return_exceptions=True
    )
    await asyncio.gather(first, return_exceptions=True)
    assert isinstance(results[0], StatementGaveUp) and isinstance(results[1], StatementGaveUp)
    assert isinstance(results[2], Bad)
    sent = [["held1", "held2", "bad1"], ["held1", "held2"], ["held1"], ["held2"], ["bad1"]]
    assert db.statements[1:] == sent


async def test_a_write_answered_in_a_resend_frees_its_key_for_the_next_write_at_once() -> None:
    # A refused batch is sent again one by one; "held" waits on a lock. The next write of
    # "a" (answered first in that resend) goes meanwhile on the other sender, instead of
    # waiting for the whole resend (lock timeouts, seconds each).
    released = asyncio.Event()
    sent: list[list[str]] = []

    async def batch(items: Sequence[str]) -> list[str]:
        sent.append(list(items))
        if "held" in items:
            raise DecideEach() from StatementGaveUp("lock timeout")
        return [f"ok:{item}" for item in items]

    async def one(item: str) -> str:
        sent.append([item])
        if item == "held":
            await released.wait()
        return f"ok:{item}"

    group = GroupCommit(batch, one, key=lambda item: item.split("#")[0], in_flight=2)
    first = asyncio.ensure_future(group.submit("first"))
    second = asyncio.ensure_future(group.submit("second"))  # both senders busy: the rest queue
    await asyncio.sleep(0)
    resent = [asyncio.ensure_future(group.submit(i)) for i in ("a", "held", "b")]
    await asyncio.gather(first, second)
    assert await asyncio.wait_for(resent[0], 1) == "ok:a"
    follow_up = await asyncio.wait_for(group.submit("a#2"), 1)  # "held" still waits
    assert follow_up == "ok:a#2" and not resent[1].done()
    released.set()
    assert await asyncio.gather(*resent) == ["ok:a", "ok:held", "ok:b"]


async def test_at_most_in_flight_statements_and_never_two_writes_of_one_key_at_once() -> None:
    running: list[list[str]] = []
    overlaps: list[tuple[str, ...]] = []
    most = 0

    async def send_batch(items: Sequence[str]) -> list[str]:
        nonlocal most
        running.append(list(items))
        most = max(most, len(running))
        keys = [i[0] for s in running for i in s]
        if len(keys) != len(set(keys)):
            overlaps.append(tuple(keys))
        await asyncio.sleep(0.001)
        running.remove(list(items))
        return [f"ok:{i}" for i in items]

    async def send_one(item: str) -> str:
        return (await send_batch([item]))[0]

    group: GroupCommit[str, str] = GroupCommit(
        send_batch, send_one, key=lambda item: item[0], in_flight=2, max_batch=2
    )
    items = [f"{key}{n}" for n in range(5) for key in "abcdef"]  # five writes per key
    results = await asyncio.gather(*(group.submit(i) for i in items))
    assert results == [f"ok:{i}" for i in items]
    assert most == 2 and overlaps == []


async def test_a_cancelled_sender_leaves_no_write_waiting() -> None:
    gate = Gate()
    group = gate.commit()
    writes = [asyncio.ensure_future(group.submit(i)) for i in "abc"]
    await asyncio.sleep(0.01)
    for task in list(group._tasks):
        task.cancel()  # the process stops
    done, pending = await asyncio.wait(writes, timeout=1)
    assert not pending and all(w.cancelled() for w in done)


async def test_a_write_still_queued_after_its_queue_timeout_is_answered_unsent() -> None:
    """The statement in flight hangs (a database that stopped answering): the writes queued
    behind it get ``Unavailable`` after ``queue_timeout``, and are never sent; the write in
    flight still gets its own statement's answer."""
    gate = Gate()
    group = gate.commit(queue_timeout=0.05)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0.01)
    queued = [asyncio.ensure_future(group.submit(i)) for i in "abc"]
    done, _ = await asyncio.wait(queued, timeout=1)
    assert len(done) == 3
    for write in queued:
        # A 503 that leaves cached states alone: the database is slow, not known to have
        # lost anything.
        assert isinstance(write.exception(), StatementGaveUp)
    assert not first.done()  # taken before its time: it waits for its statement
    gate.set()
    assert await first == "ok:first"
    assert await group.submit("d") == "ok:d"  # the next write goes as usual
    assert gate.sent == ["first", "d"]  # the expired ones were never sent


async def test_a_write_taken_in_time_is_not_expired_while_its_statement_runs() -> None:
    async def send_batch(items: Sequence[str]) -> list[str]:
        await asyncio.sleep(0.1)  # longer than the queue timeout: the statement's own time
        return [f"ok:{i}" for i in items]

    async def send_one(item: str) -> str:
        return (await send_batch([item]))[0]

    group: GroupCommit[str, str] = GroupCommit(
        send_batch, send_one, key=lambda i: i, in_flight=2, queue_timeout=0.05
    )
    assert await asyncio.gather(*(group.submit(i) for i in "ab")) == ["ok:a", "ok:b"]


async def test_queued_writes_expire_each_at_its_own_time() -> None:
    gate = Gate()
    group = gate.commit(queue_timeout=0.2)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0.01)
    older = asyncio.ensure_future(group.submit("older"))
    await asyncio.sleep(0.1)
    newer = asyncio.ensure_future(group.submit("newer"))
    await asyncio.wait([older], timeout=1)
    assert isinstance(older.exception(), Unavailable)
    assert not newer.done()  # it came 0.1 s later: its time is not up yet
    gate.set()  # the statement in flight answers before the newer write's time is up
    assert await first == "ok:first"
    assert await newer == "ok:newer"


def _held_db(
    hold: asyncio.Event, sent: list[list[str]]
) -> tuple[Callable[[Sequence[str]], Awaitable[list[str]]], Callable[[str], Awaitable[str]]]:
    """A database: \"held\" refuses its batch (a lock timeout) and hangs alone until
    ``hold``; a batch with \"hang\" hangs until ``hold``; what was sent goes in ``sent``."""

    async def batch(items: Sequence[str]) -> list[str]:
        sent.append(list(items))
        await asyncio.sleep(0)
        if "held" in items:
            raise DecideEach() from StatementGaveUp("lock timeout")
        if "hang" in items:
            await hold.wait()
        return [f"ok:{i}" for i in items]

    async def one(item: str) -> str:
        sent.append([item])
        await asyncio.sleep(0)
        if item == "held":
            await hold.wait()
        return f"ok:{item}"

    return batch, one


async def test_cancelling_every_sender_sends_no_queued_write_afterwards() -> None:
    # Shutdown cancels the senders (a snapshot of _tasks); the write queued behind a busy key
    # must be cancelled, not sent by a sender the cancelled one starts in its finally.
    hold, sent = asyncio.Event(), list[list[str]]()
    batch, one = _held_db(hold, sent)
    group = GroupCommit(batch, one, key=lambda i: i.split("#")[0], in_flight=2)
    first = asyncio.ensure_future(group.submit("first"))
    await asyncio.sleep(0)
    hung = [asyncio.ensure_future(group.submit(i)) for i in ("a", "hang")]
    await first
    for _ in range(5):
        await asyncio.sleep(0)
    assert sent[-1] == ["a", "hang"]
    later = asyncio.ensure_future(group.submit("a#2"))  # waits on key "a"
    for _ in range(5):
        await asyncio.sleep(0)
    for task in list(group._tasks):
        task.cancel()  # shutdown
    _, pending = await asyncio.wait([*hung, later], timeout=1)
    assert not pending
    assert ["a#2"] not in sent, sent
    assert later.cancelled()
    assert group._senders == 0


async def test_a_sender_started_by_a_release_and_cancelled_before_it_ran_is_not_counted() -> None:
    # The resend answers "a" and starts a sender for "a#2"; the caller of "a" wakes first and
    # shuts down (cancels every sender, the new one before its first step).
    hold, sent = asyncio.Event(), list[list[str]]()
    batch, one = _held_db(hold, sent)
    group = GroupCommit(batch, one, key=lambda i: i.split("#")[0], in_flight=2)
    first = asyncio.ensure_future(group.submit("first"))
    second = asyncio.ensure_future(group.submit("second"))
    await asyncio.sleep(0)
    resent = [asyncio.ensure_future(group.submit(i)) for i in ("a", "held", "b")]
    await asyncio.gather(first, second)
    later = asyncio.ensure_future(group.submit("a#2"))  # queued: "a" busy in the resend
    assert await resent[0] == "ok:a"
    # here: the sender for "a#2" exists but has not run yet
    for task in list(group._tasks):
        task.cancel()  # shutdown
    _, pending = await asyncio.wait([*resent, later], timeout=1)
    assert not pending, f"never answered: {pending}; senders={group._senders}"
    assert group._senders == 0
