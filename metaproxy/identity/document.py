"""Signed instance-identity documents for the sidecar's task-scoped IMDS view.

SDKs and agents read `/latest/dynamic/instance-identity/document` and verify it against
`.../signature`, so the text is produced once, here, and served byte for byte: the signature
covers exactly these bytes, and any re-serialisation on the way would break it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from metaproxy.clock import iso_z
from metaproxy.errors import BadRequest, ConfigError
from metaproxy.identity.jwks import load_jwks
from metaproxy.identity.keys import PrivateKey, PublicKey, load_private_key

# AWS's own keys in AWS's order, then the task-scoped additions.
DOCUMENT_KEYS = (
    "accountId",
    "architecture",
    "availabilityZone",
    "imageId",
    "instanceId",
    "instanceType",
    "pendingTime",
    "privateIp",
    "region",
    "version",
    "taskId",
    "tenant",
)
MAX_VALUE_CHARS = 256
MAX_SIGNATURE_CHARS = 1024


def render_document(document: Mapping[str, object]) -> str:
    """The document text as served: two-space indent and `" : "`, the way EC2 prints it."""
    unknown = set(document) - set(DOCUMENT_KEYS)
    if unknown:
        raise BadRequest(f"identity document: unknown keys {', '.join(sorted(unknown))}")
    missing = [name for name in DOCUMENT_KEYS if name not in document]
    if missing:
        raise BadRequest(f"identity document: missing keys {', '.join(missing)}")
    values: dict[str, str] = {}
    for name in DOCUMENT_KEYS:
        value = document[name]
        if isinstance(value, datetime):
            value = iso_z(value)
        if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS or not value.isprintable():
            raise BadRequest(f"identity document: {name} must be printable text up to 256 chars")
        values[name] = value
    return json.dumps(values, indent=2, separators=(",", " : "), ensure_ascii=True)


@functools.lru_cache(maxsize=8)
def _cached_private_key(path: Path, file_state: tuple[int, int, int]) -> PrivateKey:
    return load_private_key(path)[0]


def _signing_key(path: Path) -> PrivateKey:
    """The key at `path`, parsed once per version of the file: the broker signs per request."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot load private key {path}: {exc.strerror}") from None
    return _cached_private_key(Path(path), (st.st_mtime_ns, st.st_size, st.st_ino))


def sign_document(key_path: Path, document: Mapping[str, object]) -> tuple[str, str]:
    """(document text, base64 signature over its exact UTF-8 bytes) with an Ed25519 or P-256 key."""
    text = render_document(document)
    key = _signing_key(key_path)
    data = text.encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
    else:
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))  # DER-encoded (r, s)
    return text, base64.b64encode(signature).decode("ascii")


def _verification_keys(path: Path) -> list[PublicKey]:
    """The keys a JWKS file or a PEM file (public, or private for convenience) provides."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    if raw.lstrip().startswith(b"{"):
        return [key for key, _ in load_jwks(path).values()]
    if b"PRIVATE KEY" in raw:
        return [load_private_key(path)[0].public_key()]
    try:
        public = serialization.load_pem_public_key(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"key file {path} is neither a JWKS nor a PEM key") from None
    if not isinstance(public, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"key file {path}: only Ed25519 and P-256 keys sign documents")
    return [public]


def verify_document(jwks_or_public_key_path: Path, document_text: str, signature_b64: str) -> bool:
    """True only if some key in the file signed exactly `document_text`."""
    keys = _verification_keys(jwks_or_public_key_path)
    if not isinstance(signature_b64, str) or len(signature_b64) > MAX_SIGNATURE_CHARS:
        return False
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    data = document_text.encode()
    for key in keys:
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                continue  # RSA keys in a Kubernetes JWKS never sign our documents
        except InvalidSignature:
            continue
        return True
    return False
