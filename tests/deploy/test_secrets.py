"""Nothing secret is committed, and the broker's guest account stays a local-development default."""

import base64
import hashlib
import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import ModuleType

import yaml

from shared.topology import PERMISSIONS

ROOT = Path(__file__).resolve().parents[2]

SECRETS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "password or key assigned a literal": re.compile(
        r"(?i)\b[\w-]*(?:password|passwd|secret|api_?keys?|token)\b[\"']?\s*[:=]\s*[\"']"
        r"(?!change-me|\*\*\*|\{|\$|[a-z_]+[\"'])[^\"'\s]{8,}[\"']"
    ),
    "credentials in a URL": re.compile(
        r"\b[a-z][a-z0-9+.-]*://(?!guest:guest@)[^/\s:@'\"]+:[^@\s/'\"]+@"
    ),
}
# Where a match is not a secret, and why.
ALLOWED = {
    "testbed/processes.py": "the test producers' key, for tests only",
    "tests/deploy/test_secrets.py": "the samples the scan must find",
}
# The local-development broker's default account used as a credential (in a URL, as a user
# setting, as a quoted user name), and the only places that may do so.
GUEST = re.compile(r"guest:guest|(?i:default_user|default_pass)\W+guest|[\"']guest[\"']")
GUEST_ALLOWED = (
    ".ci/run",  # CI's own local broker
    ".env.example",  # shows the default of RABBITMQ_URL
    "README.md",  # the same default, and the test command
    "bench/",  # runs against the local broker
    "scripts/dev.py",  # make dev runs against the local broker
    "shared/src/shared/settings.py",  # the default of RABBITMQ_URL, for local development
    "tests/",  # the tests' own brokers and users
)


def tracked() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return [f for f in files if f.is_file() and f.name != "uv.lock"]


def test_no_secret_is_committed() -> None:
    found = []
    for path in tracked():
        relative = str(path.relative_to(ROOT))
        text = path.read_text(errors="ignore")
        for kind, pattern in SECRETS.items():
            for match in pattern.finditer(text):
                if relative not in ALLOWED:
                    found.append(f"{relative}: {kind}: {match.group(0)[:60]}")
    assert found == []


def test_secrets_folder_and_env_file_are_ignored() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "secrets/api-keys", ".env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == ["secrets/api-keys", ".env"]


def test_guest_is_named_only_in_local_development_defaults() -> None:
    named = [
        str(path.relative_to(ROOT))
        for path in tracked()
        if GUEST.search(path.read_text(errors="ignore"))
    ]
    assert named  # the scan reads the files
    assert [n for n in named if not n.startswith(GUEST_ALLOWED)] == []


def test_the_scan_finds_what_it_looks_for() -> None:
    samples = {
        "private key": "-----BEGIN RSA PRIVATE KEY-----",
        "AWS access key": "id = AKIAABCDEFGHIJKLMNOP",
        "password or key assigned a literal": 'DB_PASSWORD = "hunter2hunter2"',
        "credentials in a URL": "amqp://producer:s3cretpass@rabbitmq:5672/orders",
    }
    for kind, sample in samples.items():
        assert SECRETS[kind].search(sample), kind
    assert not SECRETS["credentials in a URL"].search("amqp://guest:guest@127.0.0.1:5672/")
    assert not SECRETS["password or key assigned a literal"].search('PASSWORD = "change-me"')
    for credential in ("amqp://guest:guest@host/", "RABBITMQ_DEFAULT_USER: guest", "user='guest'"):
        assert GUEST.search(credential), credential
    assert not GUEST.search("a node that loads definitions creates no guest user")


def load_make_secrets() -> ModuleType:
    """scripts/make_secrets.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("make_secrets", ROOT / "scripts/make_secrets.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_up_secrets_cover_compose_and_keep_what_exists(tmp_path: Path) -> None:
    local_secrets = load_make_secrets()

    made = local_secrets.ensure(tmp_path)
    assert set(made) == {*local_secrets.PASSWORDS, "api-keys"}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for secret in compose["secrets"].values():
        assert (tmp_path / Path(secret["file"]).name).exists(), secret
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert local_secrets.ensure(tmp_path) == []  # a second run keeps every secret
    for name in (*local_secrets.PASSWORDS, "api-keys"):
        assert (tmp_path / name).read_text() == first[name]

    definitions = json.loads((tmp_path / "rabbitmq-definitions.json").read_text())
    assert definitions["vhosts"] == [{"name": "orders"}]
    assert {u["name"] for u in definitions["users"]} == {"operator", "producer", "consumer"}
    assert "guest" not in json.dumps(definitions)
    for user in definitions["users"]:
        raw = base64.b64decode(user["password_hash"])
        password = (tmp_path / f"{user['name']}-amqp-password").read_text().strip()
        assert raw[4:] == hashlib.sha256(raw[:4] + password.encode()).digest()
    permissions = {p["user"]: p for p in definitions["permissions"]}
    for role, expected in PERMISSIONS.items():
        assert permissions[role]["write"] == expected.write
        assert permissions[role]["read"] == expected.read
        assert permissions[role]["configure"] == expected.configure
