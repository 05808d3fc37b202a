"""The errors the worker decides on.

OrdersError
├── PermanentError        never retried: dead-lettered at once
│   └── InvalidMessage    poison: not an order we can read
└── TransientError        retried with backoff (so is any unexpected exception)
    └── PaymentUnavailable
"""


class OrdersError(Exception):
    """Root of this project's errors."""


class PermanentError(OrdersError):
    """Retrying cannot help."""


class InvalidMessage(PermanentError):
    """A message that does not follow the contract in docs/messages.md."""


class TransientError(OrdersError):
    """May succeed if tried again later."""


class PaymentUnavailable(TransientError):
    """The (simulated) payment gateway failed."""
