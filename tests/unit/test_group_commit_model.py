"""A randomised model check of group commit against a fake database that answers at
random (a batch or a write refused, given up on, lost before or after its commit), with
writes of a few keys coming at random moments, callers that give up, and shutdowns (every
sender cancelled). Each seed is one run; the invariants hold in every one: a key never in
two statements at once, nothing sent after a shutdown, no write committed twice, every
caller answered, an answer that says "not written" never given for a committed write, and
no sender or key left over."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from services.appointments.adapters.postgres.group_commit import _NOT_TAKEN, DecideEach, GroupCommit
from services.appointments.service_layer.ports import StatementGaveUp
from services.errors import Unavailable


class Refused(Exception):
    """The database's refusal of a batch, naming the bad writes."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(sorted(names))
        self.names = names


class Bad(Exception):
    """A write's own refusal."""


class RandomDatabase:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.committed: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.in_flight: list[str] = []  # keys
        self.violations: list[str] = []
        self.shut = False

    async def _statement(self, items: Sequence[str]) -> None:
        if self.shut:
            self.violations.append(f"{list(items)} sent after every sender was cancelled")
        for item in items:
            self.sent[item] += 1
            key = item.split(":")[0]
            if key in self.in_flight:
                self.violations.append(f"key {key} in two statements at once")
            self.in_flight.append(key)
        try:
            await asyncio.sleep(self.rng.choice([0, 0, 0.001, 0.005, 0.02]))
        finally:
            for item in items:
                self.in_flight.remove(item.split(":")[0])

    async def send_batch(self, items: Sequence[str]) -> list[str]:
        await self._statement(items)
        roll = self.rng.random()
        if roll < 0.05:
            raise Unavailable("down before the commit")
        if roll < 0.08:
            self.committed.update(items)
            raise Unavailable("lost after the commit")  # an unknown outcome
        bad = {item for item in items if item.endswith("bad")}
        if bad or roll < 0.15:
            cause = Refused(bad) if self.rng.random() < 0.7 else StatementGaveUp("timeout")
            raise DecideEach() from cause
        self.committed.update(items)
        return [f"ok:{item}" for item in items]

    async def send_one(self, item: str) -> str:
        await self._statement([item])
        roll = self.rng.random()
        if roll < 0.05:
            raise Unavailable("down before the commit")
        if roll < 0.08:
            self.committed[item] += 1
            raise Unavailable("lost after the commit")
        if roll < 0.15:
            raise StatementGaveUp("timeout")
        if item.endswith("bad"):
            raise Bad(item)
        self.committed[item] += 1
        return f"ok:{item}"


def _implicated(item: str, cause: BaseException) -> bool:
    return isinstance(cause, Refused) and item in cause.names


async def _run(seed: int) -> list[str]:
    rng = random.Random(seed)
    db = RandomDatabase(rng)
    group = GroupCommit(
        db.send_batch,
        db.send_one,
        key=lambda item: item.split(":")[0],
        implicated=_implicated,
        in_flight=rng.choice([1, 2]),
        max_batch=rng.choice([2, 4, 128]),
        queue_timeout=0.03,
    )
    callers: dict[str, asyncio.Task[str]] = {}
    gave_up: set[str] = set()
    keys = rng.choice([2, 3, 7])
    shutdown_at = rng.randint(3, 60) if rng.random() < 0.3 else None
    loop = asyncio.get_running_loop()

    def give_up(item: str) -> None:
        if not callers[item].done():
            callers[item].cancel()
            gave_up.add(item)

    for n in range(rng.randint(5, 60)):
        item = f"k{rng.randint(0, keys - 1)}:{n}" + ("bad" if rng.random() < 0.15 else "")
        callers[item] = asyncio.ensure_future(group.submit(item))
        if rng.random() < 0.08:  # its caller gives up later, at a random moment
            loop.call_later(rng.choice([0, 0.001, 0.004, 0.01, 0.03]), give_up, item)
        if rng.random() < 0.5:
            await asyncio.sleep(rng.choice([0, 0, 0.001, 0.01]))
        if rng.random() < 0.1:
            give_up(rng.choice(list(callers)))
        if shutdown_at == n:
            await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
            await asyncio.sleep(0)  # every submit so far has queued its write
            for task in list(group._tasks):
                task.cancel()
            db.shut = True
            break
    _, unanswered = await asyncio.wait(callers.values(), timeout=3)
    if group._tasks:  # callers that gave up mid-statement: their sender runs on
        await asyncio.wait(set(group._tasks), timeout=2)
    for _ in range(5):
        await asyncio.sleep(0)
    problems = list(db.violations)
    if group._senders != len(group._tasks) or (not unanswered and group._senders):
        problems.append(f"{group._senders} senders counted, {len(group._tasks)} running")
    if group._busy and not group._tasks:
        problems.append(f"keys left taken: {group._busy}")
    if unanswered:
        problems.append(f"{len(unanswered)} callers never answered")
    for item, caller in callers.items():
        committed, sent = db.committed[item], db.sent[item]
        if committed > 1:
            problems.append(f"{item} committed {committed} times")
        if not caller.done():
            continue
        if caller.cancelled():
            if item not in gave_up and not db.shut:
                problems.append(f"{item}: cancelled, its caller had not given up")
            continue
        error = caller.exception()
        if error is None:
            if committed != 1:
                problems.append(f"{item}: answered ok, committed {committed} times")
        elif isinstance(error, StatementGaveUp | Bad):
            if committed:
                problems.append(f"{item}: answered {error!r} but committed")
            if str(error) == _NOT_TAKEN and sent:
                problems.append(f"{item}: answered not taken but sent")
        elif not isinstance(error, Unavailable):  # an unknown outcome may be either
            problems.append(f"{item}: unexpected {error!r}")
    return problems


@pytest.mark.parametrize("seed", range(40))
async def test_group_commit_keeps_its_invariants(seed: int) -> None:
    assert await _run(seed) == []
