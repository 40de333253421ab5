"""The fleet's X.509 material for ``edgetune-aggregator provision``: a CA, and server and client
certificates it issues (EC P-256, which every OpenSSL-based broker and client supports),
made with the ``cryptography`` package: no OpenSSL command line needed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: the CA outlives the certificates it signs, so devices added in a year still get full terms
CA_DAYS = 3650
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def san_entry(host: str) -> x509.GeneralName:
    """An IP literal becomes an IPAddress entry (clients compare IPs against those), else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_NAME.match(host):
        raise ValueError(f"--broker-host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """EC P-256: every OpenSSL-based broker and client supports it (Ed25519 TLS certs are not)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_name(fleet: str, common_name: str) -> x509.Name:
    # the fleet goes into OU, so a rerun can tell whose CA a folder holds
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgetune"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def key_usage(ca: bool) -> x509.KeyUsage:
    """Signing only: ECDHE needs no key encipherment; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def make_ca(fleet: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_tls_key()
    now = dt.datetime.now(dt.UTC)
    name = subject_name(fleet, f"edgetune {fleet} CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issue(self, fleet: str, common_name: str, days: int,
              server_hosts: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of a leaf: a server certificate naming ``server_hosts``,
        or a client certificate whose CN is the MQTT username. Never outlives the CA."""
        key = new_tls_key()
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(subject_name(fleet, common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([san_entry(h) for h in server_hosts]),
                                            critical=False)
        return key_pem(key), cert_pem(builder.sign(self.key, hashes.SHA256()))


def load_ca(ca_dir: Path, fleet: str) -> x509.Certificate | None:
    """The CA certificate already in ``ca_dir``, refusing one that belongs to another fleet."""
    path = ca_dir / "ca.crt"
    if not path.exists():
        if (ca_dir / "ca.key").exists():
            raise ValueError(f"--out: {ca_dir} has ca.key but no ca.crt; restore ca.crt or remove the folder")
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    owner = units[0].value if units else None
    if owner != fleet:
        raise ValueError(f"--out: {path.parent.parent} holds the CA of fleet {owner!r}, not {fleet!r}; "
                         "use another --out folder or the matching --fleet")
    return cert


def ca_for_issuing(ca_dir: Path, cert: x509.Certificate) -> Ca:
    key_path = ca_dir / "ca.key"
    if not key_path.exists():
        raise ValueError(f"--out: new credentials need the fleet CA's key, {key_path}, which is missing; "
                         "copy ca.key back from where you keep it offline and run again")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ValueError(f"--out: {key_path} does not belong to {ca_dir / 'ca.crt'}; restore the matching pair")
    return Ca(key, cert)
