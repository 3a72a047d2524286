"""The HTTP API (Litestar) for the mobile gateway."""
