"""``clinic dev``'s early check of its HTTP address, IPv4 and IPv6."""

from __future__ import annotations

import socket

import pytest

from services.config import ConfigError
from services.dev import check_port_free, url_host


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_free_port_passes_and_a_taken_one_is_a_configuration_error(
    family: socket.AddressFamily, host: str
) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="CLINIC_HTTP_PORT"):
            check_port_free(host, port)
    check_port_free(host, port)  # free again


def test_an_ipv4_listener_does_not_make_ipv6_any_taken() -> None:
    """uvicorn binds "::" IPv6 only: a process on 127.0.0.1 at that port is no obstacle."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        check_port_free("::", other.getsockname()[1])


def test_urls_name_ipv6_hosts_in_brackets() -> None:
    assert url_host("::1") == "[::1]" and url_host("127.0.0.1") == "127.0.0.1"


def test_port_0_is_refused_for_clinic_dev() -> None:
    """It prints the API's URL and checks its readiness there: it needs the real port."""
    with pytest.raises(ConfigError, match="fixed CLINIC_HTTP_PORT"):
        check_port_free("127.0.0.1", 0)
