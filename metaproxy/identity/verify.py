"""Verifying identity tokens: the broker's only source of truth about who is asking.

Every check that can be made on the header is made before any signature verification, and the
algorithm is never taken from the token: it is pinned by the type of the key the `kid` names,
which defeats `alg: none`, HS256-with-the-public-key and similar algorithm-confusion attacks.
Rejections raise `Unauthenticated` whose detail names the failed check and never the token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from metaproxy.clock import Clock, SystemClock
from metaproxy.config import TrustedIssuer
from metaproxy.errors import ConfigError, Unauthenticated
from metaproxy.identity.keys import PublicKey, VerifyingAlgorithm, b64url_decode, load_jwks
from metaproxy.identity.names import name_problem
from metaproxy.models import Identity

log = logging.getLogger("metaproxy.identity")

MAX_TOKEN_BYTES = 8 * 1024
MAX_CLAIM_CHARS = 256
MAX_CLAIM_DEPTH = 4
MAX_LIST_ITEMS = 16
# Platform tokens live at most a day (issue.py enforces it); a longer one was not minted by us.
MAX_PLATFORM_LIFETIME = 86_400
# pyjwt's implementations of the algorithms a key can be pinned to.
_ALGORITHMS = {alg: jwt.get_algorithm_by_name(alg) for alg in ("EdDSA", "ES256", "RS256")}
# Headers that make the token name its own key, change how the payload is read, or mark JWE.
FORBIDDEN_HEADERS = ("crit", "jwk", "jku", "x5u", "x5c", "b64", "enc", "zip")


@dataclass(slots=True)
class _IssuerKeys:
    """One trusted issuer's JWKS, re-read whenever the file is replaced or edited."""

    trust: TrustedIssuer
    keys: dict[str, tuple[PublicKey, VerifyingAlgorithm]]
    file_state: tuple[int, int, int]
    failed_state: tuple[int, int, int] | None = None


def _file_state(trust: TrustedIssuer) -> tuple[int, int, int]:
    # The inode catches an atomic rename even when the mtime has not ticked.
    st = os.stat(trust.jwks_file)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError("duplicate member")
        result[name] = value
    return result


def _decode_json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part), object_pairs_hook=_reject_duplicates)
    except ValueError:  # covers base64, UTF-8 and JSON errors, and duplicate members
        raise Unauthenticated(
            f"malformed token: {what} is not base64url JSON", reason="malformed"
        ) from None
    except RecursionError:
        # `[[[[…` a few thousand deep fits in 8 KB and exhausts json's recursion: before this
        # it escaped as a pre-auth 500 with a traceback and no audit record.
        raise Unauthenticated(
            f"malformed token: {what} is nested too deeply", reason="malformed"
        ) from None
    if not isinstance(value, dict):
        raise Unauthenticated(f"malformed token: {what} is not a JSON object", reason="malformed")
    return value


def _check_value(name: str, value: object, depth: int = 0) -> None:
    """Claims are strings of at most 256 characters, finite numbers, or small nests of those."""
    if depth > MAX_CLAIM_DEPTH:
        raise Unauthenticated(f"claim {name} is nested too deeply", reason="invalid_claims")
    if isinstance(value, str):
        if len(value) > MAX_CLAIM_CHARS:
            raise Unauthenticated(
                f"claim {name} is longer than {MAX_CLAIM_CHARS} characters", reason="invalid_claims"
            )
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        # Python's json accepts NaN and Infinity, which would poison every time comparison.
        if not math.isfinite(value) or abs(value) > 2**53:
            raise Unauthenticated(f"claim {name} is not a finite number", reason="invalid_claims")
    elif isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise Unauthenticated(f"claim {name} has too many items", reason="invalid_claims")
        for item in value:
            _check_value(name, item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(f"{name}.{key}", item, depth + 1)


def _text(claims: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = claims.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise Unauthenticated(f"claim {name} must be a non-empty string", reason="invalid_claims")
    return value


def _name(claims: Mapping[str, Any], name: str) -> str:
    """A claim that policies write into ARNs and resource paths (identity/names.py)."""
    value = _text(claims, name)
    problem = name_problem(value)
    if problem:
        raise Unauthenticated(f"claim {name} {problem}", reason="invalid_claims")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"claim {name} must be a number", reason="invalid_claims")
    return float(value)


class IdentityVerifier:
    """Verifies platform and Kubernetes identity tokens against the trusted issuers' JWKS files."""

    def __init__(
        self,
        issuers: Sequence[TrustedIssuer],
        *,
        leeway: int = 30,
        clock: Clock | None = None,
        cluster_name: str = "",
        cluster_arn: str = "",
    ) -> None:
        """`cluster_name`, `cluster_arn`: the cluster Kubernetes identities come from, for
        EKS Pod Identity-compatible session tags (`${cluster_name}`, `${cluster_arn}`)."""
        if not 0 <= leeway <= 300:
            raise ConfigError("token leeway must be between 0 and 300 seconds")
        self._leeway = leeway
        self._clock: Clock = clock or SystemClock()
        self._cluster = (cluster_name, cluster_arn)
        self._issuers: dict[str, _IssuerKeys] = {}
        for trust in issuers:
            if trust.issuer in self._issuers:
                raise ConfigError(f"issuer {trust.issuer!r} is trusted twice")
            try:
                state = _file_state(trust)
            except OSError as exc:
                raise ConfigError(f"cannot read JWKS {trust.jwks_file}: {exc.strerror}") from None
            # A bad JWKS at start-up is refused outright: better not to start than trust nothing.
            self._issuers[trust.issuer] = _IssuerKeys(trust, load_jwks(trust.jwks_file), state)

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or `Unauthenticated` naming the failed check."""
        header, claims_unverified = self._parse(token)
        self._check_header(header)
        issuer = claims_unverified.get("iss")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise Unauthenticated("untrusted issuer (iss)", reason="unknown_issuer")
        entry = self._refresh(self._issuers[issuer])
        key, alg = self._select_key(entry, header)
        if header["alg"] != alg:
            raise Unauthenticated(
                f"alg {header['alg']!r} does not match the key's pinned {alg}",
                reason="bad_signature",
            )
        if alg == "RS256" and entry.trust.kind != "kubernetes":
            raise Unauthenticated(
                "RS256 is accepted only from kubernetes issuers", reason="bad_signature"
            )
        if not token.rsplit(".", 1)[1]:
            raise Unauthenticated("malformed token: empty signature", reason="malformed")
        claims = self._decode(token, claims_unverified, key, alg, entry.trust)
        if entry.trust.kind == "kubernetes":
            identity = self._kubernetes_identity(claims)
            cluster_name, cluster_arn = self._cluster
            return dataclasses.replace(identity, cluster_name=cluster_name, cluster_arn=cluster_arn)
        return self._platform_identity(claims)

    # -- structure and header -------------------------------------------------------------

    @staticmethod
    def _parse(token: object) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(token, str) or not token:
            raise Unauthenticated("malformed token: empty", reason="malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(
                f"malformed token: longer than {MAX_TOKEN_BYTES} bytes", reason="malformed"
            )
        if not token.isascii():
            raise Unauthenticated("malformed token: not ASCII", reason="malformed")
        if token.lstrip().startswith("{"):
            raise Unauthenticated(
                "malformed token: JWS JSON serialisation is not accepted", reason="malformed"
            )
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated(
                "malformed token: compact serialisation needs exactly two dots", reason="malformed"
            )
        header = _decode_json_part(parts[0], "header")
        try:
            b64url_decode(parts[2])
        except ValueError:
            raise Unauthenticated(
                "malformed token: signature is not base64url", reason="malformed"
            ) from None
        payload = _decode_json_part(parts[1], "payload")
        return header, payload

    @staticmethod
    def _check_header(header: Mapping[str, Any]) -> None:
        for name in FORBIDDEN_HEADERS:
            if name in header:
                raise Unauthenticated(f"header {name!r} is not accepted", reason="malformed")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise Unauthenticated("header alg is missing", reason="malformed")
        if alg.lower() == "none":
            raise Unauthenticated("alg none is not accepted", reason="bad_signature")
        if alg.upper().startswith("HS"):
            raise Unauthenticated(f"symmetric alg {alg} is not accepted", reason="bad_signature")
        if alg not in ("EdDSA", "ES256", "RS256"):
            raise Unauthenticated(f"alg {alg[:16]!r} is not supported", reason="bad_signature")
        if "typ" in header and header["typ"] not in ("JWT", "jwt"):
            raise Unauthenticated("header typ must be JWT", reason="malformed")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > 256):
            raise Unauthenticated("header kid must be a non-empty string", reason="malformed")

    # -- keys ---------------------------------------------------------------------------------

    def _refresh(self, entry: _IssuerKeys) -> _IssuerKeys:
        """Re-read a JWKS whose file changed; a broken replacement keeps the last good keys."""
        try:
            state = _file_state(entry.trust)
        except OSError:
            return entry  # removed or unreadable for a moment: keep verifying with what we have
        if state in (entry.file_state, entry.failed_state):
            return entry
        try:
            entry.keys = load_jwks(entry.trust.jwks_file)
        except ConfigError as exc:
            entry.failed_state = state
            log.warning("keeping previous JWKS for %s: %s", entry.trust.issuer, exc.detail)
            return entry
        entry.file_state, entry.failed_state = state, None
        log.info("reloaded JWKS for %s (%d keys)", entry.trust.issuer, len(entry.keys))
        return entry

    @staticmethod
    def _select_key(
        entry: _IssuerKeys, header: Mapping[str, Any]
    ) -> tuple[PublicKey, VerifyingAlgorithm]:
        kid = header.get("kid")
        if kid is None:
            if len(entry.keys) == 1:
                return next(iter(entry.keys.values()))
            raise Unauthenticated(
                "token has no kid and the issuer has several keys", reason="bad_signature"
            )
        found = entry.keys.get(kid)
        if found is None:
            raise Unauthenticated("unknown kid for this issuer", reason="bad_signature")
        return found

    # -- claims -------------------------------------------------------------------------------

    def _decode(
        self,
        token: str,
        claims: dict[str, Any],
        key: PublicKey,
        alg: VerifyingAlgorithm,
        trust: TrustedIssuer,
    ) -> dict[str, Any]:
        """Check the signature with pyjwt's implementation of the pinned algorithm, then the
        claims `_parse` already decoded (strictly: duplicate members refused). jwt.decode would
        parse the token a second time, with a per-character base64 check in Python: a third of
        the broker's CPU for a refused request during a burst."""
        signing_input, _, signature = token.rpartition(".")
        try:
            valid = _ALGORITHMS[alg].verify(signing_input.encode(), key, b64url_decode(signature))
        except (ValueError, TypeError):
            valid = False
        if not valid:
            raise Unauthenticated("signature verification failed", reason="bad_signature")
        for name in ("exp", "iat", "iss", "aud"):
            if name not in claims:
                raise Unauthenticated(f"missing required claim {name}", reason="invalid_claims")
        if claims["iss"] != trust.issuer:
            raise Unauthenticated("issuer (iss) does not match", reason="unknown_issuer")
        for name, value in claims.items():
            _check_value(name, value)
        audience = claims["aud"]
        # A token meant for several services could be replayed by any of them: only a single
        # audience is accepted (as a string, or a list of one).
        if isinstance(audience, list):
            if len(audience) != 1:
                raise Unauthenticated(
                    "several audiences (aud) are not accepted", reason="wrong_audience"
                )
            audience = audience[0]
        if audience != trust.audience:
            raise Unauthenticated("audience (aud) does not match", reason="wrong_audience")
        self._check_times(claims, trust)
        return claims

    def _check_times(self, claims: Mapping[str, Any], trust: TrustedIssuer) -> None:
        now = self._clock.now().timestamp()
        expires, issued = _number(claims, "exp"), _number(claims, "iat")
        if now > expires + self._leeway:
            raise Unauthenticated("token expired (exp)", reason="expired")
        if issued > now + self._leeway:
            raise Unauthenticated("token issued in the future (iat)", reason="not_yet_valid")
        if "nbf" in claims and _number(claims, "nbf") > now + self._leeway:
            raise Unauthenticated("token not yet valid (nbf)", reason="not_yet_valid")
        if expires <= issued:
            raise Unauthenticated(
                "token expires before it was issued (exp <= iat)", reason="invalid_claims"
            )
        if trust.kind == "platform" and expires - issued > MAX_PLATFORM_LIFETIME:
            raise Unauthenticated(
                "token lifetime (exp - iat) exceeds one day", reason="invalid_claims"
            )

    @staticmethod
    def _platform_identity(claims: Mapping[str, Any]) -> Identity:
        task, tenant = _name(claims, "task"), _name(claims, "tenant")
        app = _text(claims, "app", required=False)
        if app:
            app = _name(claims, "app")
        subject = _text(claims, "sub")
        if subject != f"task:{tenant}/{task}":
            raise Unauthenticated(
                "claim sub does not match task and tenant", reason="invalid_claims"
            )
        return Identity(
            kind="platform",
            issuer=_text(claims, "iss"),
            subject=subject,
            task=task,
            tenant=tenant,
            app=app,
            token_id=_text(claims, "jti"),
            expires_at=_number(claims, "exp"),
        )

    @staticmethod
    def _kubernetes_identity(claims: Mapping[str, Any]) -> Identity:
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict):
            raise Unauthenticated("claim kubernetes.io is missing", reason="invalid_claims")
        namespace = _text(k8s, "namespace")
        account = k8s.get("serviceaccount")
        if not isinstance(account, dict):
            raise Unauthenticated(
                "claim kubernetes.io.serviceaccount is missing", reason="invalid_claims"
            )
        account_name = _text(account, "name")
        _text(account, "uid")
        subject = _text(claims, "sub")
        if subject != f"system:serviceaccount:{namespace}:{account_name}":
            raise Unauthenticated(
                "claim sub does not match namespace and service account", reason="invalid_claims"
            )
        task = account_name
        pod = k8s.get("pod")
        pod_name = pod_uid = ""
        if pod is not None:
            if not isinstance(pod, dict):
                raise Unauthenticated(
                    "claim kubernetes.io.pod must be an object", reason="invalid_claims"
                )
            pod_name = _text(pod, "name", required=False)
            pod_uid = _text(pod, "uid", required=False)
            task = pod_name or pod_uid or task
        return Identity(
            kind="kubernetes",
            issuer=_text(claims, "iss"),
            subject=subject,
            task=task,
            tenant="",
            app=account_name,
            namespace=namespace,
            service_account=account_name,
            token_id=_text(claims, "jti", required=False),
            expires_at=_number(claims, "exp"),
            pod_name=pod_name,
            pod_uid=pod_uid,
        )
