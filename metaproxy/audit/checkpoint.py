"""Signed checkpoints: a statement "log L had head H at seq N" signed with Ed25519.

Like a Certificate Transparency signed tree head, a checkpoint kept outside the log's own
directory (shipped to S3, pasted in a ticket) pins everything up to its seq: a later edit
changes the head, a truncation loses the seq. The signed statement is exactly
`{"log_id", "seq", "head", "time", "segment"}`, domain separated; the file also carries the
signing key's id and the signature, both checked for their one canonical spelling so that no
byte of a checkpoint file can change without verification noticing.

In a fleet the statement also carries `witness`: the latest checkpoints of the *other*
replicas, as `{log_id: {"seq", "head", "digest"}}` (digest: SHA-256 of that checkpoint file's
bytes). Each replica's chain then vouches for the others', so a whole chain deleted from the
shipped copy is noticed from the chains that remain (see `fleet.py`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metaproxy.audit.chain import canonical_json, is_hex_hash
from metaproxy.audit.names import segment_first_seq

CHECKPOINT_DOMAIN: Final = b"metaproxy-audit-checkpoint-v1\x00"
# The writer's default: verification takes younger unanchored records for a live log's tail.
CHECKPOINT_EVERY_SECONDS: Final = 60.0
# Beyond the interval: the writer's maintenance tick, a slow disk, and the clocks of the broker
# and of the host running the check disagreeing by a few seconds.
LIVE_TAIL_SLACK_SECONDS: Final = 30.0
_SIGNATURE_RE: Final = re.compile(r"^[0-9a-f]{128}$")
_KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class Witness:
    """Another replica's checkpoint as witnessed: its seq, head and the file's SHA-256."""

    seq: int
    head: str
    digest: str

    def as_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "head": self.head, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    log_id: str
    seq: int
    head: str
    time: str
    segment: str
    key_id: str
    signature: str
    witness: Mapping[str, Witness] = field(default_factory=dict)

    def statement(self) -> dict[str, object]:
        statement: dict[str, object] = {
            "log_id": self.log_id,
            "seq": self.seq,
            "head": self.head,
            "time": self.time,
            "segment": self.segment,
        }
        # Present only when non-empty, under the same v1 domain: a checkpoint that witnesses
        # nothing keeps exactly the bytes (and signature input) every existing log has, and
        # canonical JSON is injective, so a signature over a statement with one witness set
        # can never verify for another set, or for none.
        if self.witness:
            statement["witness"] = {
                log_id: entry.as_dict() for log_id, entry in sorted(self.witness.items())
            }
        return statement

    def to_bytes(self) -> bytes:
        return canonical_json({**self.statement(), "key_id": self.key_id, "sig": self.signature})


def signed_bytes(statement: dict[str, object]) -> bytes:
    return CHECKPOINT_DOMAIN + canonical_json(statement)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def file_digest(data: bytes) -> str:
    """What a witness pins: the SHA-256 of a checkpoint file's exact bytes."""
    return hashlib.sha256(data).hexdigest()


def sign_checkpoint(
    key: Ed25519PrivateKey,
    *,
    log_id: str,
    seq: int,
    head: str,
    time: str,
    segment: str,
    witness: Mapping[str, Witness] | None = None,
) -> Checkpoint:
    witnessed = dict(witness or {})
    if log_id in witnessed:
        raise ValueError("a checkpoint cannot witness its own log")
    unsigned = Checkpoint(log_id, seq, head, time, segment, "", "", witnessed)
    signature = key.sign(signed_bytes(unsigned.statement())).hex()
    return Checkpoint(
        log_id, seq, head, time, segment, key_id(key.public_key()), signature, witnessed
    )


def parse_checkpoint(data: bytes) -> Checkpoint:
    """Parse a checkpoint file; raises ValueError unless it is well formed and canonical."""
    import json

    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    expected_keys = {"log_id", "seq", "head", "time", "segment", "key_id", "sig"}
    if not isinstance(raw, dict) or set(raw) - {"witness"} != expected_keys:
        raise ValueError("not a checkpoint object")
    seq, log_id, time, segment = raw["seq"], raw["log_id"], raw["time"], raw["segment"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError("bad seq")
    if not isinstance(log_id, str) or not isinstance(time, str) or not isinstance(segment, str):
        raise ValueError("bad log_id, time or segment")
    if segment_first_seq(segment) is None:
        raise ValueError("bad segment name")
    if not is_hex_hash(raw["head"]):
        raise ValueError("bad head")
    if not isinstance(raw["key_id"], str) or not _KEY_ID_RE.match(raw["key_id"]):
        raise ValueError("bad key_id")
    if not isinstance(raw["sig"], str) or not _SIGNATURE_RE.match(raw["sig"]):
        raise ValueError("bad signature encoding")
    witness = _parse_witness(raw.get("witness", {}), log_id)
    checkpoint = Checkpoint(
        log_id, seq, raw["head"], time, segment, raw["key_id"], raw["sig"], witness
    )
    # Also refuses `"witness":{}`, which `to_bytes` never writes.
    if checkpoint.to_bytes() + b"\n" != data:
        raise ValueError("not in canonical form")
    return checkpoint


def _parse_witness(raw: object, own_log_id: str) -> dict[str, Witness]:
    if not isinstance(raw, dict):
        raise ValueError("bad witness")
    witness: dict[str, Witness] = {}
    for log_id, entry in raw.items():
        if not log_id or log_id == own_log_id:
            raise ValueError("bad witness log_id")
        if not isinstance(entry, dict) or set(entry) != {"seq", "head", "digest"}:
            raise ValueError(f"bad witness entry for {log_id}")
        seq = entry["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError(f"bad witness seq for {log_id}")
        if not is_hex_hash(entry["head"]) or not is_hex_hash(entry["digest"]):
            raise ValueError(f"bad witness head or digest for {log_id}")
        witness[log_id] = Witness(seq, entry["head"], entry["digest"])
    return witness


def signature_problem(checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> str | None:
    """None if `checkpoint` was signed by `public_key`, else what is wrong."""
    if checkpoint.key_id != key_id(public_key):
        return f"signed by key {checkpoint.key_id}, expected {key_id(public_key)}"
    try:
        public_key.verify(bytes.fromhex(checkpoint.signature), signed_bytes(checkpoint.statement()))
    except InvalidSignature:
        return "bad signature"
    return None


@dataclass(frozen=True, slots=True)
class WitnessedCheckpoint:
    """What a replica publishes of its latest signed audit checkpoint, for others to witness."""

    log_id: str
    seq: int
    head: str
    digest: str  # sha256 of the checkpoint file's bytes
    time: str
