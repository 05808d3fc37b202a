"""An HTTPS CONNECT proxy to PyPI only, for image builds in the engine's namespace.

scripts/docker-engine.sh runs dockerd in a network namespace with no route out; its builds reach
PyPI (``uv sync`` in the Dockerfile) through this proxy on the host side of the namespace's link,
given to them as the predefined ``HTTPS_PROXY`` build argument. It tunnels bytes to the hosts
below on port 443 and refuses anything else.

    python3 scripts/pypi_proxy.py HOST PORT
"""

import asyncio
import sys

ALLOWED = {("pypi.org", 443), ("files.pythonhosted.org", 443)}


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
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or (host, int(port or 0)) not in ALLOWED:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
    except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(_client, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
