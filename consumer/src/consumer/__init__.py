"""The worker: takes orders off RabbitMQ, reserves stock in PostgreSQL exactly once, then acks."""
