"""Everything a local run needs — keys, certificates, and the arguments that start a broker and
a sidecar on loopback — shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

ISSUER = "metaproxy-platform"
AUDIENCE = "metaproxy-broker"
# The broker signs its calls to the local emulator with moto's documented fake credentials.
EMULATOR_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class LocalKeys:
    identity_key: Path
    jwks: Path
    ca: Path
    broker_cert: Path
    broker_key: Path
    document_key: Path
    document_jwks: Path
    audit_key: Path
    audit_pub: Path


def make_local_keys(directory: Path) -> LocalKeys:
    """Identity, document, TLS and audit keys in `directory`: fresh ones each run, except the
    audit signing key, which is reused if present."""
    from metaproxy.audit.signing_keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, write_keypair
    from metaproxy.commands.certs import init_certs
    from metaproxy.identity.keys import generate_keypair

    identity_key, jwks = generate_keypair(directory, "identity")
    document_key, document_jwks = generate_keypair(directory, "document")
    certs = init_certs(directory / "tls", force=True)
    # The audit signing key is kept across runs: the audit log in the same state directory goes
    # on from where it stopped, and its old checkpoints must still verify.
    audit_dir = directory / "audit-keys"
    audit_key, audit_pub = audit_dir / PRIVATE_KEY_NAME, audit_dir / PUBLIC_KEY_NAME
    if not (audit_key.exists() and audit_pub.exists()):
        audit_key, audit_pub = write_keypair(audit_dir)
    return LocalKeys(
        identity_key=identity_key,
        jwks=jwks,
        ca=certs["ca.pem"],
        broker_cert=certs["broker.pem"],
        broker_key=certs["broker.key"],
        document_key=document_key,
        document_jwks=document_jwks,
        audit_key=audit_key,
        audit_pub=audit_pub,
    )


@dataclass(frozen=True)
class FleetSecrets:
    store_key_file: Path  # AES-GCM keys sealing credentials in the store, one base64 key a line
    control_token_file: Path  # the control API's bearer token
    store_password_file: Path  # the shared store's password (a fleet of replicas only)

    @property
    def store_password(self) -> str:
        return self.store_password_file.read_text().strip()


CONTROL_TOKEN_BYTES = 32
STORE_PASSWORD_BYTES = 32


def make_fleet_secrets(directory: Path) -> FleetSecrets:
    """The store key, the control token and the store's password in `directory` (mode 0600),
    reused if present: the store and the revocations in the same state directory outlive a run,
    and credentials sealed under the old key would only be misses under a new one."""
    from metaproxy.broker.store.sealing import generate_key_line
    from metaproxy.fsutil import write_atomically

    directory.mkdir(parents=True, exist_ok=True)
    store_key = directory / "store.key"
    if not store_key.exists():
        write_atomically(store_key, f"{generate_key_line()}\n".encode("ascii"), 0o600)
    control_token = directory / "control.token"
    if not control_token.exists():
        # No newline: it goes into an Authorization header as the file holds it.
        token = secrets.token_urlsafe(CONTROL_TOKEN_BYTES)
        write_atomically(control_token, token.encode("ascii"), 0o600)
    store_password = directory / "store.password"
    if not store_password.exists():
        # URL-safe, so it goes into a redis:// URL and a Redis config line as it is.
        password = secrets.token_urlsafe(STORE_PASSWORD_BYTES)
        write_atomically(store_password, password.encode("ascii"), 0o600)
    return FleetSecrets(
        store_key_file=store_key,
        control_token_file=control_token,
        store_password_file=store_password,
    )


def broker_args(
    keys: LocalKeys,
    *,
    policies_dir: Path,
    audit_dir: Path,
    sts_endpoint: str,
    instance: str,
    fleet: FleetSecrets | None = None,
    state_dir: Path | None = None,
    store: bool = False,
) -> list[str]:
    """`metaproxy broker` on loopback ports chosen by the kernel, TLS, trusting `keys`.

    With `fleet`, also the control API on a kernel-chosen loopback port; a shared store
    (`store=True`) is sealed with the fleet's store key, and its URL, which holds the store's
    password, is for the environment (`store_env`), not the command line every user can read."""
    args = [
        "broker",
        *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
        *("--tls-cert", str(keys.broker_cert), "--tls-key", str(keys.broker_key)),
        *("--policies-dir", str(policies_dir), "--trust", f"{ISSUER},{AUDIENCE},{keys.jwks}"),
        *("--document-key", str(keys.document_key), "--audit-dir", str(audit_dir)),
        *("--audit-key", str(keys.audit_key), "--sts-endpoint", sts_endpoint),
        *("--instance", instance, "--log-format", "json"),
    ]
    if fleet is not None:
        args += ["--control-listen", "127.0.0.1:0"]
        args += ["--control-token-file", str(fleet.control_token_file)]
        if store:
            args += ["--store-key-file", str(fleet.store_key_file)]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    return args


def store_env(url: str) -> dict[str, str]:
    """The broker's `--store` as its environment holds it (METAPROXY_STORE): a URL with the
    store's password stays out of `ps` and /proc/PID/cmdline."""
    from metaproxy.config import env_name

    return {env_name("store"): url}


def sidecar_args(
    keys: LocalKeys, *, broker_url: str, identity_file: Path, authorization_file: Path
) -> list[str]:
    """`metaproxy sidecar` on loopback ports chosen by the kernel."""
    return [
        "sidecar",
        *("--broker-url", broker_url, "--broker-ca-file", str(keys.ca)),
        *("--identity-token-file", str(identity_file), "--imds-listen", "127.0.0.1:0"),
        *("--container-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
        *("--authorization-token-file", str(authorization_file), "--log-format", "json"),
    ]
