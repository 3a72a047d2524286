"""``clinic notifications`` with every timer ten times shorter, for the fault tests.

``python -m tests.support.notifications_process`` runs the very service ``clinic
notifications`` runs (same settings, same code), only with :data:`FAST_TUNING`: the
production ack wait (30 s) and delivery lease (60 s) would make a test that kills the
service wait minutes for the redeliveries. Every ratio between the timers is kept, so a
race the production timers allow shows up here too.
"""

from __future__ import annotations

from datetime import timedelta

from services.cli import run_until_signalled
from services.config import load_settings
from services.logs import configure_logging
from services.notifications.main import run_notifications
from services.notifications.runtime import Tuning

#: The production :class:`Tuning`, every duration divided by ten.
FAST_TUNING = Tuning(
    redelivery_backoff=(3.0, 6.0, 30.0, 90.0),
    fetch_timeout=0.2,
    consumer_check_interval=3.0,
    not_ready_delay=0.2,
    poll_interval=0.1,
    lease=timedelta(seconds=6),
    retry_base=timedelta(seconds=0.5),
    retry_cap=timedelta(seconds=90),
    directory_timeout=0.1,
    # Not shorter: what a silence waits out is a NATS client's own failover (its pings
    # every 5 s), which no tuning of this service shortens.
    directory_silence=30.0,
)


def main() -> None:
    """Run the notification service until SIGTERM, like ``clinic notifications``."""
    settings = load_settings()
    configure_logging(settings.log_level)
    run_until_signalled(
        lambda stop: run_notifications(settings, stop, tuning=FAST_TUNING, serve_ops_http=True)
    )


if __name__ == "__main__":
    main()
