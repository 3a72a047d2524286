"""The NATS service API (``appointments`` micro service) for the other clinic services."""
