"""Instance-identity documents: served byte for byte, and any change breaks the signature."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from metaproxy.errors import BadRequest
from metaproxy.identity.document import sign_document, verify_document
from metaproxy.identity.keys import generate_keypair, load_private_key

DOCUMENT: dict[str, object] = {
    "accountId": "123456789012",
    "architecture": "x86_64",
    "availabilityZone": "us-east-1a",
    "imageId": "ami-0abcdef1234567890",
    "instanceId": "i-0123456789abcdef0",
    "instanceType": "m5.large",
    "pendingTime": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    "privateIp": "10.0.0.12",
    "region": "us-east-1",
    "version": "2017-09-30",
    "taskId": "task-1",
    "tenant": "acme",
}


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_sign_and_verify_round_trip(tmp_path: Path, algorithm: Literal["EdDSA", "ES256"]) -> None:
    """A signed document verifies against the JWKS of the key that signed it."""
    key, jwks = generate_keypair(tmp_path, "doc", algorithm)
    text, signature = sign_document(key, DOCUMENT)
    assert verify_document(jwks, text, signature)
    assert json.loads(text)["pendingTime"] == "2024-05-01T12:00:00Z"
    assert list(json.loads(text)) == list(DOCUMENT)


def test_document_text_looks_like_ec2s(tmp_path: Path) -> None:
    """The text is EC2's pretty form: two-space indent, `" : "`, no trailing newline."""
    key, _ = generate_keypair(tmp_path)
    text, _ = sign_document(key, DOCUMENT)
    assert text.startswith('{\n  "accountId" : "123456789012",\n  "architecture" : "x86_64",')
    assert text.endswith('  "tenant" : "acme"\n}')


def test_ed25519_signature_covers_exact_bytes(tmp_path: Path) -> None:
    """The Ed25519 signature is over the document's exact UTF-8 bytes (64 bytes, base64)."""
    key, _ = generate_keypair(tmp_path)
    text, signature = sign_document(key, DOCUMENT)
    private, _, _ = load_private_key(key)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    signature_bytes = base64.b64decode(signature)
    assert len(signature_bytes) == 64
    private.public_key().verify(signature_bytes, text.encode())  # raises if not over these bytes


@pytest.mark.parametrize("position", [0, 20, -1, -3])
def test_one_character_change_fails(tmp_path: Path, position: int) -> None:
    """Changing any single character of the document invalidates the signature."""
    key, jwks = generate_keypair(tmp_path)
    text, signature = sign_document(key, DOCUMENT)
    changed = list(text)
    changed[position] = "X" if changed[position] != "X" else "Y"
    assert not verify_document(jwks, "".join(changed), signature)


def test_other_key_and_garbage_signatures_fail(tmp_path: Path) -> None:
    """A signature by another key, or one that is not base64, does not verify."""
    key, _ = generate_keypair(tmp_path / "a")
    _, other_jwks = generate_keypair(tmp_path / "b")
    text, signature = sign_document(key, DOCUMENT)
    assert not verify_document(other_jwks, text, signature)
    own_jwks = tmp_path / "a" / "identity.jwks.json"
    assert not verify_document(own_jwks, text, "not base64!")
    assert not verify_document(own_jwks, text, base64.b64encode(b"short").decode())
    assert not verify_document(own_jwks, text, "")


def test_verify_with_public_key_pem(tmp_path: Path) -> None:
    """A PEM public key works as well as a JWKS."""
    key, _ = generate_keypair(tmp_path, algorithm="ES256")
    pem = tmp_path / "doc.pub.pem"
    pem.write_bytes(
        load_private_key(key)[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    text, signature = sign_document(key, DOCUMENT)
    assert verify_document(pem, text, signature)
    assert not verify_document(pem, text.replace("acme", "acmf"), signature)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"billingProducts": "x"}, "unknown keys billingProducts", id="unknown-key"),
        pytest.param({"tenant": None}, "tenant must be printable", id="null-value"),
        pytest.param({"taskId": "a\nb"}, "taskId must be printable", id="newline-value"),
        pytest.param({"region": "r" * 257}, "region must be printable", id="long-value"),
    ],
)
def test_sign_document_validates_fields(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    """Only the documented keys, each printable text, are signed."""
    key, _ = generate_keypair(tmp_path)
    with pytest.raises(BadRequest, match=message):
        sign_document(key, {**DOCUMENT, **change})


def test_sign_document_requires_every_key(tmp_path: Path) -> None:
    """A document missing a key is refused, naming the key."""
    key, _ = generate_keypair(tmp_path)
    partial = {k: v for k, v in DOCUMENT.items() if k != "instanceId"}
    with pytest.raises(BadRequest, match="missing keys instanceId"):
        sign_document(key, partial)


def test_replaced_signing_key_is_used_at_once(tmp_path: Path) -> None:
    """After the document key file is replaced, new documents are signed with the new key."""
    key, old_jwks = generate_keypair(tmp_path / "old", "doc")
    text, signature = sign_document(key, DOCUMENT)
    assert verify_document(old_jwks, text, signature)
    new_key, new_jwks = generate_keypair(tmp_path / "new", "doc")
    key.write_bytes(new_key.read_bytes())
    text, signature = sign_document(key, DOCUMENT)
    assert verify_document(new_jwks, text, signature)
    assert not verify_document(old_jwks, text, signature)
