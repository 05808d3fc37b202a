"""A proxy to two package registries only, PyPI and Debian's archive, for image builds in the
engine's namespace.

scripts/docker-engine.sh runs dockerd in a network namespace with no route out; its builds reach
PyPI (``uv sync``, ``pip install``) and Debian (``apt-get``) through this proxy on the host side
of the namespace's link, given to them as the predefined ``HTTPS_PROXY`` and ``http_proxy`` build
arguments. It tunnels CONNECT to PyPI's hosts on port 443, forwards plain HTTP requests to
Debian's archive on port 80 (apt's own transport; the packages are signed), and refuses anything
else.

    python3 scripts/registry_proxy.py HOST PORT
"""

import asyncio
import sys

TUNNELLED = {("pypi.org", 443), ("files.pythonhosted.org", 443)}
FORWARDED = {"deb.debian.org"}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            allowed = (host, int(port or 0)) in TUNNELLED
        else:  # absolute-form (http://host/path), which an HTTP/1.1 server accepts as it is
            host, port = target.removeprefix("http://").split("/", 1)[0], "80"
            allowed = target.startswith("http://") and host in FORWARDED
        if not allowed:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
        writer.close()
        return
    if method == "CONNECT":
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    else:  # the request goes on as it came; later ones on this connection go to the same host
        upstream_writer.write(head)
    await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(_client, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
