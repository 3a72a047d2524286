"""Application layer: ports, and the handlers every entrypoint (HTTP, NATS) calls."""
