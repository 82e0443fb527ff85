"""The admission endpoint: AdmissionReview (admission.k8s.io/v1) in, AdmissionReview out.

The API server is the only legitimate caller, but the body is still validated field by field:
anything that is not a well-formed review of a Pod is answered 400 with a JSON error, and the
webhook keeps serving. `process` puts these handlers behind a guarded listener.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from metaproxy.errors import BadRequest
from metaproxy.net.httperrors import identity_encoding_only, json_errors
from metaproxy.webhook.config import WebhookConfig
from metaproxy.webhook.patch import InjectionRefused, InjectionSettings, NotAPod, build_patch

log = logging.getLogger("metaproxy.webhook")

SETTINGS = web.AppKey("settings", InjectionSettings)
MAX_BODY_BYTES = 1024 * 1024  # a Pod is a few KiB; the API server caps objects at about 1.5 MiB
REVIEW_API_VERSION = "admission.k8s.io/v1"
MAX_UID_LENGTH = 128


def _bad(message: str) -> BadRequest:
    return BadRequest(message, public_message=message)


async def _read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _bad(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _bad(f"body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _bad("body is not a JSON document") from None


def _review_request(review: Any) -> Mapping[str, Any]:
    """The `request` of a v1 AdmissionReview about a Pod, with a usable uid."""
    if not isinstance(review, Mapping):
        raise _bad("body must be a JSON object")
    if review.get("apiVersion") != REVIEW_API_VERSION or review.get("kind") != "AdmissionReview":
        raise _bad(f"expected apiVersion {REVIEW_API_VERSION} and kind AdmissionReview")
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise _bad("request must be an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > MAX_UID_LENGTH:
        raise _bad("request.uid must be a non-empty string")
    kind = request.get("kind")
    if kind is not None and (
        not isinstance(kind, Mapping)
        or (kind.get("group"), kind.get("version"), kind.get("kind")) != ("", "v1", "Pod")
    ):
        raise _bad("request.kind must be the core v1 Pod kind")
    return request


def _response(uid: str, **fields: Any) -> web.Response:
    review = {
        "apiVersion": REVIEW_API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **fields},
    }
    return web.json_response(review)


async def mutate(request: web.Request) -> web.Response:
    review_request = _review_request(await _read_json(request))
    uid: str = review_request["uid"]
    if review_request.get("operation", "CREATE") != "CREATE" or review_request.get("subResource"):
        return _response(uid, allowed=True)  # only new pods get a sidecar
    pod = review_request.get("object")
    if not isinstance(pod, Mapping) or pod.get("kind", "Pod") != "Pod":
        raise _bad("request.object must be a Pod")
    namespace = review_request.get("namespace") or "?"
    metadata = pod.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    name = metadata.get("name") or metadata.get("generateName") or "?"
    try:
        patch = build_patch(pod, request.app[SETTINGS])
    except NotAPod as exc:
        raise _bad(f"request.object is not a valid Pod: {exc}") from None
    except InjectionRefused as exc:
        log.warning("refused to inject %s/%s: %s", namespace, name, exc)
        message = f"metaproxy sidecar injection refused: {exc}"
        return _response(uid, allowed=False, status={"code": 422, "message": message})
    if not patch:
        return _response(uid, allowed=True)
    log.info("injecting sidecar into %s/%s (%d patch operations)", namespace, name, len(patch))
    encoded = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    return _response(uid, allowed=True, patchType="JSONPatch", patch=encoded)


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(settings: InjectionSettings) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, identity_encoding_only], client_max_size=MAX_BODY_BYTES
    )
    app[SETTINGS] = settings
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


def settings_from_config(config: WebhookConfig) -> InjectionSettings:
    return InjectionSettings(
        image=config.image.strip(),
        broker_url=config.broker_url,
        broker_ca_configmap=config.broker_ca_configmap,
        image_pull_policy=config.image_pull_policy,
        link_local=config.link_local,
        region=config.region,
        node_metadata=config.node_metadata,
        termination_notice_seconds=config.termination_notice_seconds,
    )
