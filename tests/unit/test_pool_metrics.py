"""The pools' gauges: each pool under its own name, read at each scrape, 0 once it is gone."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from services.metrics import watch_pool


class Sizes:
    """What the gauges read of a pool."""

    def __init__(self, size: int, idle: int, most: int) -> None:
        self.size, self.idle, self.most = size, idle, most

    def get_size(self) -> int:
        return self.size

    def get_idle_size(self) -> int:
        return self.idle

    def get_max_size(self) -> int:
        return self.most


def sample(pool: str, state: str) -> float | None:
    return REGISTRY.get_sample_value("clinic_db_pool_connections", {"pool": pool, "state": state})


def test_two_services_of_one_process_keep_their_own_pools_apart() -> None:
    appointments, notifications = Sizes(5, 2, 10), Sizes(1, 3, 10)
    watch_pool("test-appointments", appointments)
    watch_pool("test-notifications", notifications)
    assert sample("test-appointments", "busy") == 3 and sample("test-appointments", "idle") == 2
    notifications.size = 4
    assert sample("test-notifications", "busy") == 1  # read at each scrape
    assert (
        REGISTRY.get_sample_value("clinic_db_pool_max_connections", {"pool": "test-appointments"})
        == 10
    )


def test_a_pool_that_is_gone_reads_0_and_is_not_kept_alive() -> None:
    pool = Sizes(7, 1, 10)
    watch_pool("test-gone", pool)
    assert sample("test-gone", "busy") == 6
    del pool
    gc.collect()
    assert sample("test-gone", "busy") == 0 and sample("test-gone", "idle") == 0
