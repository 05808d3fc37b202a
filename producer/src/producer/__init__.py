"""The HTTP API: stores orders with their outbox entry in one transaction, then publishes them."""
