"""``make up`` runs this first: local secrets for the compose stack, made once, never committed.

Writes under ``secrets/`` (git-ignored), keeping any file that already exists:

- one random password per account: the broker's operator, producer and consumer users, the
  database owner, and the producer's and consumer's database roles; and for the cluster variant,
  the Erlang cookie its RabbitMQ nodes share, its database's replication password and the
  password of Patroni's REST API;
- ``api-keys``: one API key, named ``local``;
- ``rabbitmq-definitions.json``: the vhost, the users (salted SHA-256 hashes of their passwords,
  as RabbitMQ stores them) and their permissions from ``shared/topology.py``, which RabbitMQ
  loads at boot, so the stack has no ``guest``.

Delete a file and run ``make up`` again to rotate that secret (docs/security.md).
"""

import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

from shared.topology import PERMISSIONS

ROOT = Path(__file__).resolve().parents[1]
VHOST = "orders"
BROKER_USERS = {"operator": "operator", "producer": "producer", "consumer": "consumer"}
PASSWORDS = (
    "operator-amqp-password",
    "producer-amqp-password",
    "consumer-amqp-password",
    "postgres-password",
    "producer-db-password",
    "consumer-db-password",
    "erlang-cookie",  # the cluster variant's nodes share it (docker-compose.cluster.yml)
    "replication-password",  # the cluster variant's database: its standbys' replication role
    "patroni-api-password",  # and what changes it through Patroni's REST API
)


def rabbitmq_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _write(path: Path, content: str) -> None:
    path.write_text(content)
    path.chmod(0o644)  # read by the containers' non-root users; the folder itself is 0700


def ensure(folder: Path) -> list[str]:
    """Make whatever is missing; returns the names of the files made."""
    folder.mkdir(mode=0o700, exist_ok=True)
    made = []
    for name in PASSWORDS:
        if not (folder / name).exists():
            _write(folder / name, secrets.token_urlsafe(24))
            made.append(name)
    if not (folder / "api-keys").exists():
        _write(folder / "api-keys", f"local:{secrets.token_urlsafe(32)}")
        made.append("api-keys")
    # Rewritten every time: it follows the password files and the permissions in the code.
    users, permissions = [], []
    for role, user in BROKER_USERS.items():
        password = (folder / f"{role}-amqp-password").read_text().strip()
        tags = ["administrator"] if role == "operator" else []
        users.append(
            {
                "name": user,
                "password_hash": rabbitmq_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags,
                "limits": {},
            }
        )
        p = PERMISSIONS[role]
        permissions.append(
            {
                "user": user,
                "vhost": VHOST,
                "configure": p.configure,
                "write": p.write,
                "read": p.read,
            }
        )
    definitions = {"vhosts": [{"name": VHOST}], "users": users, "permissions": permissions}
    _write(folder / "rabbitmq-definitions.json", json.dumps(definitions, indent=2) + "\n")
    return made


def main() -> int:
    folder = Path(os.environ.get("SECRETS_DIR", ROOT / "secrets"))
    made = ensure(folder)
    if made:
        print(f"made {', '.join(made)} in {folder}", file=sys.stderr)
    if "api-keys" in made:
        key = (folder / "api-keys").read_text().split(":", 1)[1]
        print(f"your API key (X-API-Key), kept in {folder}/api-keys: {key}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
