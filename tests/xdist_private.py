"""How ``make test`` shares the tests out between pytest-xdist's workers: by what they share.

The one module that reaches into xdist's private names (its scheduler's ``_split_scope``; the
``xdist_group`` mark does not group under pytest 9.2, whose node ids xdist can no longer suffix).
A group runs on one worker, in order; groups run beside each other.
"""

from xdist.scheduler import LoadScopeScheduling

# Groups of their own: nodes and servers of their own (the fault suite), a Docker engine of
# their own (the deploy tests), vhosts and databases of their own (the benchmarks' smoke forms).
# Everything else shares the one vhost and database of RABBITMQ_URL and DATABASE_URL.
APART = ("tests/faults/", "tests/deploy/test_stack.py", "tests/bench/")


class ByGroup(LoadScopeScheduling):
    """xdist's ``loadscope``, with a test's group as its scope."""

    def _split_scope(self, nodeid: str) -> str:
        return next((part for part in APART if nodeid.startswith(part)), "shared")
