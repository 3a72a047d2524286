"""Entrypoints: HTTP for the mobile gateway, NATS for the clinic services."""
