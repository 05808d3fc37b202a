"""URLs a crawl may visit or a webhook be sent to: normalisation, and the address policy against
server-side forgery.

A crawler fetches URLs that strangers write, and a webhook posts to one, so by default both refuse
any host that resolves to a private, loopback, link-local or otherwise non-public address. The
check runs on the resolved addresses (a public name pointing at 10.0.0.1 is refused too), at
submission (or registration) and again at every connection the consumer makes (redirect targets
are pages of their own, checked the same way; webhooks follow no redirect). Hosts named in
CRAWL_ALLOWED_PRIVATE_HOSTS (WEBHOOK_ALLOWED_PRIVATE_HOSTS) are exempt.
"""

import asyncio
import ipaddress
import socket
import unicodedata
from urllib.parse import urljoin, urlsplit, urlunsplit

SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048
_TAB_AND_NEWLINES = str.maketrans("", "", "\t\n\r")


class AddressRefused(OSError):
    """The host is, or resolves to, an address crawls (or webhooks) may not reach."""


class Unusable(ValueError):
    """A URL a client gave that may not be used: ``problem`` and ``title`` say which way, for
    the 422 the API answers."""

    def __init__(self, problem: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.problem, self.title = problem, title


def normalise(url: str, base: str | None = None) -> str | None:
    """``url`` made absolute against ``base``, fragment dropped, scheme and host lowercased,
    default port removed; ``None`` when it is not an http(s) URL a crawl can follow. Tabs and
    line breaks are dropped, as browsers do; any other control character (NUL too) or a lone
    surrogate makes it unfollowable: PostgreSQL could not store it, and no server could see it."""
    url = url.strip().translate(_TAB_AND_NEWLINES)
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in url):
        return None
    try:
        parts = urlsplit(urljoin(base, url) if base else url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    result = urlunsplit((scheme, host, parts.path or "/", parts.query, ""))
    return result if len(result) <= MAX_URL_LENGTH else None


def host_of(url: str) -> str:
    """The lowercased host name of a normalised URL (no port)."""
    return (urlsplit(url).hostname or "").lower()


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def parse_hosts(value: str) -> frozenset[str]:
    """``"127.0.0.1, localhost"`` as a set of lowercased host names."""
    return frozenset(h.strip().lower() for h in value.split(",") if h.strip())


def ip_literal(host: str) -> str | None:
    """The address ``host`` spells (``[::1]`` too), or None when it is a name."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def resolve(host: str, port: int = 0) -> list[str]:
    """Every address ``host`` resolves to (the host itself when it is an IP literal)."""
    if (literal := ip_literal(host)) is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


CRAWLS, WEBHOOKS = "CRAWL_ALLOWED_PRIVATE_HOSTS", "WEBHOOK_ALLOWED_PRIVATE_HOSTS"


async def checked(url: str, allowed_private: frozenset[str], setting: str = CRAWLS) -> str:
    """``url`` normalised, once its host resolves only to addresses it may reach; else
    ``Unusable`` saying why (not an http(s) URL, no such host, a non-public address)."""
    normal = normalise(url)
    if normal is None:
        raise Unusable(
            "validation-error", "Invalid URL", "Give an absolute http or https URL with a host."
        )
    host = host_of(normal)
    try:
        addresses = await resolve(host)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise Unusable("unknown-host", "Unknown host", f"{host} does not resolve: {exc}") from None
    try:
        check_addresses(host, addresses, allowed_private, setting)
    except AddressRefused as exc:
        raise Unusable("address-refused", "Address not allowed", str(exc)) from None
    return normal


def check_addresses(
    host: str, addresses: list[str], allowed_private: frozenset[str], setting: str = CRAWLS
) -> None:
    """Raise ``AddressRefused`` unless every address is public or the host is exempt (named in
    ``allowed_private``, the value of ``setting``)."""
    if host.lower().strip("[]") in allowed_private:
        return
    refused = [a for a in addresses if not is_public(a)]
    if refused:
        raise AddressRefused(
            f"{host} resolves to non-public address {refused[0]}; add it to {setting} to reach it"
        )
