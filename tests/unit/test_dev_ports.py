"""``clinic dev``'s early check of its HTTP address, IPv4 and IPv6."""

from __future__ import annotations

import socket

import pytest

from services.config import ConfigError
from services.dev import check_port_free


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
