"""The errors the worker decides on.

OrdersError
├── Misconfigured         a service that cannot run as configured: it says why and stops
├── PermanentError        never retried: dead-lettered at once
│   └── InvalidMessage    poison: not an order we can read
│       └── Unrecognised  poison that names work the database does not hold as it says
└── TransientError        retried with backoff (so is any unexpected exception)
    └── PaymentUnavailable
"""


class OrdersError(Exception):
    """Root of this project's errors."""


class Misconfigured(OrdersError):
    """Retrying cannot help the service itself: its settings and the deployment disagree."""


class PermanentError(OrdersError):
    """Retrying cannot help."""


class InvalidMessage(PermanentError):
    """A message that does not follow the contract in docs/messages.md."""


class Unrecognised(InvalidMessage):
    """A readable message that does not match the system of record: an unknown order or crawl
    page where only known work may continue, or a body other than the stored one. Dead-lettered
    like any poison, but the record it names is left as it is: the message is not believed."""


class TransientError(OrdersError):
    """May succeed if tried again later."""


class PaymentUnavailable(TransientError):
    """The (simulated) payment gateway failed."""
