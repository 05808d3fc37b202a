"""AMQP over TLS: a RabbitMQ node of the test's own with a TLS listener and a certificate made
for the test. The machine's broker is not touched."""

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared import amqp, setup, topology
from shared.settings import SetupSettings
from tests.faults.nodes import RabbitNode, free_port


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        _pem(folder / "ca.pem", ca.public_bytes(pem)),
        _pem(folder / "server.pem", server.public_bytes(pem)),
        _pem(folder / "server.key", key_pem),
    )


@pytest.fixture
async def tls_node() -> AsyncIterator[tuple[RabbitNode, int, Path]]:
    tls_port = free_port()
    node = RabbitNode()
    ca, cert, key = make_certificates(node.dir)
    node.configure(
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {ca}\n"
        f"ssl_options.certfile = {cert}\n"
        f"ssl_options.keyfile = {key}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    await node.start()
    await node.add_vhost("tls")
    try:
        yield node, tls_port, ca
    finally:
        await node.stop()


async def test_services_connect_over_amqps_with_the_ca_and_not_without(
    tls_node: tuple[RabbitNode, int, Path], database_url: str
) -> None:
    _, port, ca = tls_node
    url = f"amqps://guest:guest@localhost:{port}/tls?cafile={ca}"
    # The services' own path: setup declares the topology over TLS, a publish goes through.
    await setup.run(SetupSettings(rabbitmq_url=url, database_url=database_url))
    async with await amqp.connect(url, "tls-test") as connection:
        channel = await amqp.confirmed_channel(connection)
        exchange = await channel.get_exchange(topology.ORDERS.name)
        await amqp.publish(exchange, aio_pika.Message(b"{}"), "order.created", 5)
        queue = await channel.get_queue(topology.WORK.name)
        assert (await queue.declare()).message_count == 1

    without_ca = f"amqps://guest:guest@localhost:{port}/tls"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await amqp.connect(without_ca, "no-ca")
    wrong_host = f"amqps://guest:guest@127.0.0.2:{port}/tls?cafile={ca}"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await amqp.connect(wrong_host, "wrong-host")
