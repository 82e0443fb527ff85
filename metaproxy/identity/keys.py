"""Signing keys for identity tokens and documents, and the public JWK that names each one.

Private keys are PKCS8 PEM files readable only by their owner. Public keys travel as a JWKS whose
`kid` is the RFC 7638 thumbprint, so a key's id is derived from the key and cannot be reused for a
different key by mistake. RSA keys are accepted in JWKS files only because Kubernetes signs
service-account tokens with RS256; we never generate or sign with them.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from metaproxy.errors import ConfigError
from metaproxy.fsutil import write_atomically

SigningAlgorithm = Literal["EdDSA", "ES256"]
VerifyingAlgorithm = Literal["EdDSA", "ES256", "RS256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding: any character outside the alphabet is an error, and so
    is any spelling but the canonical one.

    The last character of a length-2 or length-3 tail carries 2 or 4 bits that decode to
    nothing; a decoder that ignores them accepts 4 or 16 spellings of every token (so a
    "revoked" or "seen" token could come back under another string)."""
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url")
    if not _ALPHABET.issuperset(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    tail = len(text) % 4 - 1  # bytes in the last, partial group (none when 4 divides)
    if tail > 0 and b64url(data[-tail:])[-1] != text[-1]:
        raise ValueError("not canonical base64url (unused bits set)")
    return data


def _int_bytes(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The RFC 7638 required members of a public key (no kid, alg or use)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(f"unsupported EC curve {key.curve.name}; only P-256 is accepted")
        numbers = key.public_numbers()
        return {
            "crv": "P-256",
            "kty": "EC",
            "x": b64url(_int_bytes(numbers.x, 32)),
            "y": b64url(_int_bytes(numbers.y, 32)),
        }
    numbers_rsa = key.public_numbers()
    return {
        "e": b64url(_int_bytes(numbers_rsa.e)),
        "kty": "RSA",
        "n": b64url(_int_bytes(numbers_rsa.n)),
    }


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    required = {
        "OKP": ("crv", "kty", "x"),
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
    }
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canonical).digest())


def generate_keypair(
    out_dir: Path, name: str = "identity", algorithm: SigningAlgorithm = "EdDSA"
) -> tuple[Path, Path]:
    """Write `{name}.key` (PKCS8 PEM, 0600) and `{name}.jwks.json`; replaces existing files."""
    if not name or "/" in name or name.startswith(".") or not name.isprintable():
        raise ConfigError(f"key name {name!r} must be a plain file name")
    private: PrivateKey
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ConfigError(f"algorithm {algorithm!r} must be EdDSA or ES256")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwk: dict[str, str] = public_jwk(private.public_key())
    jwk.update(kid=jwk_thumbprint(jwk), alg=algorithm, use="sig")
    key_path = Path(out_dir) / f"{name}.key"
    jwks_path = Path(out_dir) / f"{name}.jwks.json"
    write_atomically(key_path, pem, 0o600)
    write_atomically(jwks_path, (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode(), 0o644)
    return key_path, jwks_path


def load_private_key(path: Path) -> tuple[PrivateKey, str, SigningAlgorithm]:
    """A PKCS8 PEM signing key, its kid (thumbprint) and the algorithm it signs with."""
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # The exception text may quote file content; name the file and the kind of failure only.
        raise ConfigError(f"cannot load private key {path}: {type(exc).__name__}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        alg: SigningAlgorithm = "EdDSA"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg = "ES256"
    else:
        raise ConfigError(f"private key {path}: only Ed25519 and P-256 keys can sign")
    return key, jwk_thumbprint(public_jwk(key.public_key())), alg
