"""What users would pick instead, measured beside the system (``make bench-peers``).

The modules named after a peer (``celery_peer`` ...) run in the peers' virtual environment
(made from ``requirements.txt`` by ``__main__``) and import nothing of the project: each defines two
tasks, ``noop`` and ``effect`` (one stock row locked and updated in PostgreSQL, committed before
the ack), a confirmed, persistent enqueue, and the command that runs its worker. ``run`` is their
command line; ``__main__`` (in the project's environment) drives them and prints the table.
"""
