"""``edgetune-aggregator provision``: everything a fleet needs to run over an authenticated broker.

    edgetune-aggregator provision --fleet NAME --devices N --out DIR \\
        [--broker-host HOST ...] [--port 8883] [--auth cert|password] [--days 825]

One command writes a fleet CA, the broker's TLS certificate, Mosquitto's password file, ACL and
configuration, the daemon's credentials and the fleet key that signs what it publishes
(``aggregator/fleet.key``; every device folder gets its public half, ``fleet.pub``), and one
folder per device with its TLS credentials and an Ed25519 key that signs its updates
(``aggregator/device_keys.json`` lists the public halves).
Nothing here needs OpenSSL or ``mosquitto_passwd``: the ``cryptography`` package does the X.509
work and the password hashes are computed in Python.

Running it again on the same ``DIR`` keeps the CA and every credential already issued and only
adds the devices that are missing, so devices can be added to a running fleet. The files that
describe the whole fleet (``passwd``, ``acl``, ``device_keys.json``, ``fleet.pub``,
``mosquitto.conf``, ``README.txt``) are rewritten each time from the device folders present.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from edgetune.atomic import atomic_write_bytes

from . import certificates
from .certificates import CA_DAYS, Ca, ca_for_issuing, load_ca, make_ca, san_entry
from edgetune.wire import AGGREGATOR_ID, AGGREGATOR_KINDS, DEVICE_KINDS, Topics, check_name
from edgetune.wire.signing import FleetSigner

log = logging.getLogger(__name__)

__all__ = [
    "ProvisionConfig", "ProvisionResult", "provision", "acl_text", "mosquitto_conf_text",
    "mosquitto_password_line", "parse_device_ids", "parse_broker_hosts",
    "add_provision_parser", "run_provision",
]

AUTH_MODES = ("cert", "password")
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
#: Mosquitto 2.0's ``$7$`` hash (what ``mosquitto_passwd`` writes): PBKDF2-HMAC-SHA512 with
#: 101 iterations and a 12-byte salt. The count is low, but the passwords are 192 random bits:
#: no iteration count makes guessing them cheaper or dearer in any way that matters.
PASSWORD_ITERATIONS = 101
PASSWORD_SALT_BYTES = 12
DEVICE_FILES = ("ca.crt", "client.crt", "client.key", "password", "signing.key", "signing.pub")


@dataclass(frozen=True)
class ProvisionConfig:
    """What to provision; validated here so every entry point reports the same errors."""

    fleet: str
    out: Path
    device_ids: tuple[str, ...]
    broker_hosts: tuple[str, ...] = DEFAULT_HOSTS
    port: int = 8883
    auth: str = "cert"
    days: int = 825

    def __post_init__(self) -> None:
        try:
            check_name(self.fleet, "fleet name")
        except ValueError as exc:
            raise ValueError(f"--fleet: {exc}") from None
        object.__setattr__(self, "out", Path(self.out).resolve())
        _check_device_ids(self.device_ids)
        if not self.broker_hosts:
            raise ValueError("--broker-host: give at least one host name or IP address of the broker")
        for host in self.broker_hosts:
            san_entry(host)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"--auth must be one of {', '.join(AUTH_MODES)}, got {self.auth!r}")
        if not 1 <= self.days <= CA_DAYS:
            raise ValueError(f"--days must be between 1 and {CA_DAYS}, got {self.days}")


@dataclass
class ProvisionResult:
    """What a run did: which devices it created and which it found already provisioned."""

    out: Path
    created_ca: bool
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def devices(self) -> list[str]:
        return sorted(self.created + self.kept)


# --- argument parsing -------------------------------------------------------------------------


def parse_device_ids(devices: int | None, device_ids: str | None) -> tuple[str, ...]:
    """``--devices N`` (device-000 … device-{N-1}) or ``--device-ids a,b,c``, exactly one."""
    if (devices is None) == (device_ids is None):
        raise ValueError("give either --devices N or --device-ids a,b,c (exactly one of them)")
    if devices is not None:
        if not 1 <= devices <= 100_000:
            raise ValueError(f"--devices must be between 1 and 100000, got {devices}")
        return tuple(f"device-{i:03d}" for i in range(devices))
    ids = tuple(part.strip() for part in device_ids.split(",") if part.strip())
    if not ids:
        raise ValueError("--device-ids names no device; give a comma-separated list such as sensor-a,sensor-b")
    return ids


def parse_broker_hosts(values: list[str] | None) -> tuple[str, ...]:
    """``--broker-host`` may be repeated and each may be a comma list; order kept, duplicates dropped."""
    if not values:
        return DEFAULT_HOSTS
    hosts = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return tuple(dict.fromkeys(hosts))


def _check_device_ids(ids: tuple[str, ...]) -> None:
    if not ids:
        raise ValueError("--devices/--device-ids: the fleet needs at least one device")
    for device_id in ids:
        try:
            check_name(device_id, "device id")
        except ValueError as exc:
            raise ValueError(f"--device-ids: {exc}") from None
        if device_id == AGGREGATOR_ID:
            raise ValueError(f"--device-ids: {AGGREGATOR_ID!r} is the daemon's MQTT username; pick another device id")
    duplicates = sorted(d for d, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"--device-ids names {', '.join(duplicates)} more than once")


# --- Mosquitto files --------------------------------------------------------------------------


def mosquitto_password_line(username: str, password: str, salt: bytes | None = None,
                            iterations: int = PASSWORD_ITERATIONS) -> str:
    """One line of a Mosquitto 2.0 password file: ``user:$7$ITER$b64(salt)$b64(sha512 hash)``."""
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(fleet: str, devices: list[str]) -> str:
    """The broker ACL: the daemon may do anything under the fleet's root; a device may publish
    only on its own topics and read only what the daemon addresses to every device or to it.

    Mosquitto applies ``topic`` lines to the ``user`` above them (lines before any ``user``
    would be for anonymous clients). Every device gets its own section rather than shared
    ``pattern ... %u`` lines: a username not listed here (a certificate of this CA whose device
    folder was removed, then this file regenerated) gets no access at all, and Mosquitto warns
    about patterns without ``%u``. Mosquitto 2.0 grants every subscription and checks read
    access message by message, so a device subscribed to ``update/+`` or ``#`` still receives
    only what is listed here; a denied QoS 1 publish is answered "not authorized" (0x87).
    """
    topics = Topics(fleet)
    lines = [
        f"# Mosquitto ACL of edgetune fleet {fleet!r}, written by `edgetune-aggregator provision`.",
        "# Usernames (certificate CNs with --auth cert) not listed here may do nothing.",
        "",
        f"user {AGGREGATOR_ID}",
        f"topic readwrite {topics.base}/#",
    ]
    for device_id in devices:
        lines += [
            "",
            f"user {device_id}",
            # (from the table of kinds: its own device topics to write, the fleet's and its own
            # aggregator topics to read)
            *(f"topic write {kind.pattern(topics.base, device_id)}" for kind in DEVICE_KINDS),
            *(f"topic read {kind.pattern(topics.base, device_id)}" for kind in AGGREGATOR_KINDS),
        ]
    return "\n".join(lines) + "\n"


def mosquitto_conf_text(fleet: str, broker_dir: Path, port: int, auth: str) -> str:
    """A ready-to-run ``mosquitto.conf``. Paths are absolute because Mosquitto resolves
    relative ones against its working directory, which a service manager chooses."""
    d = Path(broker_dir)
    auth_lines = (
        ["# clients authenticate with a certificate of the fleet CA; its CN is their username",
         "require_certificate true", "use_identity_as_username true"]
        if auth == "cert" else
        ["# clients authenticate with a username and password (TLS still encrypts the link)",
         "require_certificate false"]
    )
    lines = [
        f"# Mosquitto 2.0 configuration of edgetune fleet {fleet!r} (`edgetune-aggregator provision`).",
        f"# Paths are absolute: if you copy this folder elsewhere, change every path below to {d}'s new place.",
        "# Started as root, Mosquitto switches to this user BEFORE it reads any file named below:",
        "# chown them to it (README.txt). Started as another user, Mosquitto ignores this line.",
        "user mosquitto",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {d / 'acl'}",
        *([f"password_file {d / 'passwd'}"] if auth == "password" else []),
        "# retained tasks, global adapters and persistent sessions survive a broker restart",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        "max_queued_messages 10000",
        "log_dest stderr",
        "",
        f"listener {port}",
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'server.crt'}",
        f"keyfile {d / 'server.key'}",
        "# the oldest TLS accepted; TLS 1.3 is used where both sides have it",
        "tls_version tlsv1.2",
        *auth_lines,
    ]
    return "\n".join(lines) + "\n"


def readme_text(config: ProvisionConfig, devices: list[str]) -> str:
    out, fleet = config.out, config.fleet
    client_auth = ("its certificate (client.crt, client.key)" if config.auth == "cert"
                   else "its username and the password in 'password'")
    return f"""edgetune fleet {fleet!r}: credentials written by `edgetune-aggregator provision`

ca/          The fleet's certificate authority. Keep ca.key OFFLINE (not on the broker, not on
             the aggregator): whoever holds it can create devices. It is needed only to add
             devices (see the end of this file).
broker/      Copy to the broker host. Run: mosquitto -c broker/mosquitto.conf
             mosquitto.conf uses absolute paths ({out / 'broker'}): edit them after copying.
             Started as root, Mosquitto switches to the user 'mosquitto' (the `user` line)
             BEFORE it reads server.key, passwd or acl, and then writes data/, so give the
             folder to that user (every parent folder must be searchable by it):
                 chown -R mosquitto: /path/to/broker && chmod 700 /path/to/broker
             After adding or removing devices, copy the new passwd and acl over and send the
             broker SIGHUP to reload them; a device missing from acl may do nothing.
aggregator/  Copy to the machine running `edgetune-aggregator serve`. Its MQTT username is
             '{AGGREGATOR_ID}'. device_keys.json holds every device's public signing key;
             fleet.key signs what the aggregator publishes (serve --fleet-key fleet.key):
             never copy it anywhere else.
devices/ID/  Copy each folder to its device, and only there. The device's MQTT username is
             its id; it authenticates with {client_auth}.
             signing.key signs its updates; never copy it anywhere else. fleet.pub checks
             what the aggregator publishes (device run --fleet-key fleet.pub).

The broker listens on port {config.port} with TLS (names in its certificate:
{', '.join(config.broker_hosts)}). Clients verify the broker with ca.crt.
This folder holds {len(devices)} devices and every password in clear: keep it private. To add
devices, run provision again on it (it reads the device folders to rewrite passwd, acl and
device_keys.json), with ca/ca.key back in place.
"""


# --- writing ----------------------------------------------------------------------------------


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Atomic write; secrets stay 0600 from the moment they exist (mkstemp creates them so)."""
    atomic_write_bytes(path, data)
    if not secret:
        os.chmod(path, 0o644)


def _ensure_client(directory: Path, ca: Callable[[], Ca], fleet: str, username: str, days: int,
                   ca_pem: bytes) -> bool:
    """Issue ``client.key``/``client.crt``/``password`` in ``directory`` unless all are there.
    The certificate is written last, so a run killed halfway leaves no complete-looking set."""
    names = ("client.key", "password", "client.crt")
    present = [n for n in names if (directory / n).exists()]
    if len(present) == len(names):
        return False
    if present:
        log.warning("%s has %s but not all of %s: issuing new credentials for %r",
                    directory, ", ".join(present), ", ".join(names), username)
    key_pem, cert_pem = ca().issue(fleet, username, days)
    _write(directory / "ca.crt", ca_pem)
    _write(directory / "client.key", key_pem, secret=True)
    _write(directory / "password", (secrets.token_urlsafe(24) + "\n").encode(), secret=True)
    _write(directory / "client.crt", cert_pem)
    return True


def _new_device(devices_dir: Path, device_id: str, ca: Ca, config: ProvisionConfig, ca_pem: bytes) -> None:
    """Build the device's folder under a temporary name and rename it into place, so a device
    folder is either complete or absent."""
    tmp = Path(tempfile.mkdtemp(dir=devices_dir, prefix=f".{device_id}."))
    try:
        _ensure_client(tmp, lambda: ca, config.fleet, device_id, config.days, ca_pem)
        signing = ed25519.Ed25519PrivateKey.generate()
        _write(tmp / "signing.key", certificates.key_pem(signing), secret=True)
        _write(tmp / "signing.pub", signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        os.chmod(tmp, 0o700)
        os.rename(tmp, devices_dir / device_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _existing_devices(devices_dir: Path) -> list[str]:
    found = []
    for path in sorted(devices_dir.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        missing = [n for n in DEVICE_FILES if not (path / n).exists()]
        if missing:
            raise ValueError(f"--out: device folder {path} lacks {', '.join(missing)}; "
                             "remove the folder to issue the device new credentials, then run again")
        found.append(path.name)
    return found


def _public_key_b64(signing_pub: Path) -> str:
    key = serialization.load_pem_public_key(signing_pub.read_bytes())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{signing_pub} is not an Ed25519 public key; remove its device folder and run again")
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def provision(config: ProvisionConfig) -> ProvisionResult:
    """Create (or extend) the fleet's credentials under ``config.out``; see the module docstring."""
    out = config.out
    dirs = {name: out / name for name in ("ca", "broker", "aggregator", "devices")}
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    ca_cert = load_ca(dirs["ca"], config.fleet) if dirs["ca"].is_dir() else None
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    (dirs["broker"] / "data").mkdir(exist_ok=True)

    created_ca = ca_cert is None
    if created_ca and (any(dirs["devices"].iterdir()) or (dirs["broker"] / "server.crt").exists()):
        raise ValueError(f"--out: {out} holds credentials but no ca/ca.crt, so a new CA would split the fleet; "
                         "restore ca/ca.crt (and ca.key) or use an empty --out folder")
    issuer: Ca | None = None
    if created_ca:
        key, ca_cert = make_ca(config.fleet)
        issuer = Ca(key, ca_cert)
        _write(dirs["ca"] / "ca.key", certificates.key_pem(key), secret=True)
        _write(dirs["ca"] / "ca.crt", certificates.cert_pem(ca_cert))
        log.info("created the CA of fleet %r in %s", config.fleet, dirs["ca"])

    def ca() -> Ca:  # the key is loaded only if something must be signed
        nonlocal issuer
        issuer = issuer or ca_for_issuing(dirs["ca"], ca_cert)
        return issuer

    ca_pem = certificates.cert_pem(ca_cert)
    broker = dirs["broker"]
    _write(broker / "ca.crt", ca_pem)
    if not ((broker / "server.key").exists() and (broker / "server.crt").exists()):
        key_pem, cert_pem = ca().issue(config.fleet, config.broker_hosts[0], config.days, config.broker_hosts)
        _write(broker / "server.key", key_pem, secret=True)
        _write(broker / "server.crt", cert_pem)
    else:
        _warn_if_hosts_differ(broker / "server.crt", config.broker_hosts)
    _ensure_client(dirs["aggregator"], ca, config.fleet, AGGREGATOR_ID, config.days, ca_pem)
    if not (dirs["aggregator"] / "fleet.key").exists():  # the downlink's signing key (kept on re-runs)
        _write(dirs["aggregator"] / "fleet.key", certificates.key_pem(ed25519.Ed25519PrivateKey.generate()), secret=True)

    result = ProvisionResult(out, created_ca)
    existing = set(_existing_devices(dirs["devices"]))
    for device_id in config.device_ids:
        if device_id in existing:
            result.kept.append(device_id)
        else:
            _new_device(dirs["devices"], device_id, ca(), config, ca_pem)
            result.created.append(device_id)
    result.kept += sorted(existing - set(config.device_ids))  # never delete a device's credentials

    _write_fleet_files(config, result.devices)
    log.info("fleet %r in %s: %d devices (%d new)", config.fleet, out, len(result.devices), len(result.created))
    return result


def _write_fleet_files(config: ProvisionConfig, devices: list[str]) -> None:
    """Files derived from the whole fleet, rewritten from the device folders on every run."""
    out = config.out
    users = [(AGGREGATOR_ID, out / "aggregator" / "password")]
    users += [(d, out / "devices" / d / "password") for d in devices]
    passwd = "".join(mosquitto_password_line(user, path.read_text().strip()) + "\n" for user, path in users)
    _write(out / "broker" / "passwd", passwd.encode(), secret=True)
    _write(out / "broker" / "acl", acl_text(config.fleet, devices).encode())
    _write(out / "broker" / "mosquitto.conf",
           mosquitto_conf_text(config.fleet, out / "broker", config.port, config.auth).encode())
    keys = {d: _public_key_b64(out / "devices" / d / "signing.pub") for d in devices}
    document = {"format": 1, "fleet": config.fleet, "keys": keys}
    _write(out / "aggregator" / "device_keys.json", (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    fleet_pub = FleetSigner.load(out / "aggregator" / "fleet.key").public_pem()
    _write(out / "aggregator" / "fleet.pub", fleet_pub)
    for device in devices:  # (every device verifies the downlink with it; folders of older runs get it too)
        _write(out / "devices" / device / "fleet.pub", fleet_pub)
    _write(out / "README.txt", readme_text(config, devices).encode())


def _warn_if_hosts_differ(server_crt: Path, hosts: tuple[str, ...]) -> None:
    cert = x509.load_pem_x509_certificate(server_crt.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if set(san) != {san_entry(h) for h in hosts}:
        log.warning("keeping the broker certificate %s, which names %s; to name other hosts, remove "
                    "server.crt and server.key and run again", server_crt, ", ".join(str(n.value) for n in san))


# --- command line -----------------------------------------------------------------------------


def add_provision_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``provision`` to the ``edgetune-aggregator`` subcommands."""
    parser = subparsers.add_parser(
        "provision", help="create a fleet's CA, broker config and device credentials",
        description="Write a fleet CA, Mosquitto TLS/password/ACL configuration, the aggregator's "
        "credentials and one folder per device. Run again with more devices to add them.")
    parser.add_argument("--fleet", required=True, help="fleet name (the MQTT topic level)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--devices", type=int, help="create device-000 … device-{N-1}")
    which.add_argument("--device-ids", help="comma-separated device ids, instead of --devices")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (reused on a rerun)")
    parser.add_argument("--broker-host", action="append", metavar="HOST",
                        help="name or IP clients use to reach the broker; repeat or comma-separate "
                        f"(default: {','.join(DEFAULT_HOSTS)})")
    parser.add_argument("--port", type=int, default=8883, help="the broker's TLS port (default 8883)")
    parser.add_argument("--auth", default="cert", choices=AUTH_MODES,
                        help="cert: clients log in with their certificate; password: with username and password")
    parser.add_argument("--days", type=int, default=825, help="validity of the issued certificates (default 825)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> ProvisionConfig:
    return ProvisionConfig(
        fleet=args.fleet, out=args.out, device_ids=parse_device_ids(args.devices, args.device_ids),
        broker_hosts=parse_broker_hosts(args.broker_host), port=args.port, auth=args.auth, days=args.days)


def run_provision(args: argparse.Namespace) -> int:
    """Run ``provision`` from parsed arguments. Bad arguments raise ValueError naming the flag."""
    result = provision(config_from_args(args))
    log.info("wrote %s: copy broker/ to the broker host, devices/<id>/ to each device, keep ca/ "
             "offline (see README.txt)", result.out)
    return 0
