"""URLs that name several hosts, libpq's way: ``amqp://user@rabbit-1:5672,rabbit-2:5672/orders``.

``RABBITMQ_URL`` may name every node of a cluster like this (``amqp.connect`` tries them in turn).
The user, password, path and query are shared; each host keeps its own port. A URL with one host
is the one-element case.
"""

from yarl import URL


def _split(url: str) -> tuple[str, str, list[str], str]:
    """scheme, userinfo (with its ``@``, or empty), hosts, and the rest (path, query)."""
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostlist = authority.rpartition("@")
    return scheme, userinfo + at, hostlist.split(","), tail


def each(url: str) -> list[str]:
    """One URL per host, in the order given."""
    scheme, userinfo, hosts, tail = _split(url)
    return [f"{scheme}://{userinfo}{host}{tail}" for host in hosts]


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it (quoted as a URL needs), for every host."""
    first = str(URL(each(url)[0]).with_password(password))
    scheme, userinfo, _, _ = _split(first)
    _, _, hosts, tail = _split(url)
    return f"{scheme}://{userinfo}{','.join(hosts)}{tail}"


def redact(url: str) -> str:
    """``url`` safe to log: the password, if any, replaced by ``***``."""
    return with_password(url, "***") if URL(each(url)[0]).password is not None else url
