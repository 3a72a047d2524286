"""NATS JetStream adapters: stream definitions and their create-or-update from code."""
