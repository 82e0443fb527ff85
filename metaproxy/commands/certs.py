"""`metaproxy certs init`: a private CA and the broker's TLS certificate, for sidecar ↔ broker.

Sidecars trust only this CA (never the system store), so a certificate for the broker's address
from any public CA is not enough to impersonate the broker.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from metaproxy.clihelp import add_flag
from metaproxy.errors import ConfigError

if TYPE_CHECKING:  # cryptography is imported only when a command needs it
    from cryptography import x509

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_DAYS = 3650
# Certificates start a little in the past so a peer whose clock lags slightly accepts them.
BACKDATE = timedelta(minutes=5)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
FILES = ("ca.pem", "ca.key", "broker.pem", "broker.key")


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.removeprefix("*.")
    labels = name.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{host!r} is neither an IP address nor a DNS name")
    return host.rstrip(".").lower()


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage extension granting only the named usages."""
    from cryptography import x509

    usages = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )  # fmt: skip
    return x509.KeyUsage(**{name: granted.get(name, False) for name in usages})


def init_certs(
    out_dir: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Create `ca.pem`, `ca.key`, `broker.pem`, `broker.key` (EC P-256; keys 0600).

    Refuses to replace an existing CA unless `force`: every sidecar trusts it, and a new one
    would silently break them all.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from metaproxy.fsutil import write_atomically

    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"days must be between 1 and {MAX_DAYS}")
    names = [_check_host(h.strip()) for h in hosts if h.strip()]
    if not names:
        raise ConfigError("at least one host is needed")
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in FILES}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (use --force)")

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "metaproxy local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    broker_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    broker_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca_name)
        .public_key(broker_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(broker_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # Keys first: a certificate on disk without its key would be a half-initialised directory.
    write_atomically(paths["ca.key"], key_pem(ca_key), 0o600)
    write_atomically(paths["broker.key"], key_pem(broker_key), 0o600)
    write_atomically(paths["ca.pem"], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    broker_pem = broker_cert.public_bytes(serialization.Encoding.PEM)
    write_atomically(paths["broker.pem"], broker_pem, 0o644)
    return paths


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = subparsers.add_parser("certs", help="TLS material for the broker")
    commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = commands.add_parser("init", help="create a private CA and the broker's certificate")
    add_flag(
        init,
        "dir",
        type=Path,
        metavar="DIR",
        help="where ca.pem, ca.key, broker.pem and broker.key go (keys 0600)",
    )
    add_flag(
        init,
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        metavar="HOST[,HOST...]",
        help="IP addresses and DNS names the broker certificate names (comma-separated); "
        "sidecars must reach the broker by one of them",
    )
    add_flag(
        init,
        "--days",
        type=int,
        default=365,
        metavar="DAYS",
        unit="days",
        allowed=f"1 to {MAX_DAYS}",
        help="how long the CA and the certificate are valid",
    )
    add_flag(
        init,
        "--force",
        action="store_true",
        help="replace an existing CA (every sidecar trusting the old one stops connecting)",
    )
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    paths = init_certs(args.dir, args.hosts.split(","), args.days, force=args.force)
    for name, path in paths.items():
        print(f"{name:11} {path}")
    return 0
