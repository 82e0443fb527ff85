"""The sidecar-injection webhook, served on loopback and fed real AdmissionReview JSON."""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from metaproxy.podnet import LINK_LOCAL_ANNOTATION
from metaproxy.webhook.app import build_app
from metaproxy.webhook.patch import INJECTED_ANNOTATION, build_patch
from metaproxy.webhook.settings import (
    AUTH_DIR,
    DEFAULT_NODE_METADATA,
    LINK_LOCAL_CONTAINER,
    SIDECAR_NAME,
    STATE_DIR,
    InjectionSettings,
)

SETTINGS = InjectionSettings(
    image="registry.example.com/metaproxy:0.1.0",
    broker_url="https://metaproxy-broker.metaproxy.svc:8443",
    region="eu-west-1",
)
OFF = replace(SETTINGS, link_local="off")
INIT = replace(SETTINGS, link_local="init-container")
TOKEN = "s3cr3t" * 5  # what build_patch's `new_secret` returns in tests


def token() -> str:
    return TOKEN


SECRET = "/v2/credentials/" + TOKEN
REGION_ENV = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
# What the apps get: ECS's relative URI and the region where the namespace has the link-local
# addresses; a loopback FULL_URI (with the same secret path), the token file and the IMDS
# endpoint where it does not.
APP_ENV = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": SECRET, **REGION_ENV}
OFF_APP_ENV = {
    "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:8181" + SECRET,
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": "/var/run/metaproxy/auth/token",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8182/",
    **REGION_ENV,
}
ROOT = Path(__file__).resolve().parent.parent


def make_pod(
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "orders-", "namespace": "shop"}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    spec.setdefault("containers", [{"name": "app", "image": "python:3.11-slim"}])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def labelled_pod(**spec: Any) -> dict[str, Any]:
    return make_pod(labels={"metaproxy.io/inject": "true", "app": "orders"}, **spec)


def review(pod: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a pod CREATE."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def apply_patch(document: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """A strict RFC 6902 `add` applier: the parent must exist and indices must be in range."""
    result = copy.deepcopy(document)
    for op in patch:
        assert op["op"] == "add", op
        *parents, last = _pointer(op["path"])
        target: Any = result
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            assert 0 <= index <= len(target), op["path"]
            target.insert(index, copy.deepcopy(op["value"]))
        else:
            assert isinstance(target, dict), op["path"]
            target[last] = copy.deepcopy(op["value"])
    return result


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


async def post_review(client: Any, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post("/mutate", data=data, headers={"Content-Type": "application/json"})
    return response.status, await response.json()


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    return await aiohttp_client(build_app(SETTINGS))


def decoded_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    patch: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return patch


def secret_of(patched: dict[str, Any]) -> str:
    """The secret path this patch gave the pod (random per pod)."""
    return env_of(patched["spec"]["initContainers"][0])["METAPROXY_CONTAINER_CREDENTIALS_PATH"]


def with_secret(env: dict[str, str], secret: str) -> dict[str, str]:
    return {k: v.replace(SECRET, secret) for k, v in env.items()}


async def test_labelled_pod_gets_native_sidecar_volumes_and_env(client: Any) -> None:
    """A labelled pod is allowed with a JSON Patch that yields a valid Pod with the sidecar: the
    CNI plugin's annotation, ECS's relative URI for the apps and nothing else of ours."""
    pod = labelled_pod()
    status, body = await post_review(client, review(pod))
    assert status == 200
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    patched = apply_patch(pod, decoded_patch(response))

    sidecar = patched["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == SETTINGS.image
    assert sidecar["args"] == ["sidecar"]
    secret = secret_of(patched)
    assert re.fullmatch(r"/v2/credentials/[A-Za-z0-9_-]{32}", secret)
    assert env_of(sidecar) == {
        "METAPROXY_BROKER_URL": SETTINGS.broker_url,
        "METAPROXY_BROKER_CA_FILE": "/etc/metaproxy/ca/ca.pem",
        "METAPROXY_IDENTITY_TOKEN_FILE": "/var/run/secrets/metaproxy/token",
        "METAPROXY_CONTAINER_LISTEN": "127.0.0.1:8181,[::1]:8181",
        "METAPROXY_IMDS_LISTEN": "127.0.0.1:8182,[::1]:8182",
        "METAPROXY_ADMIN_LISTEN": "0.0.0.0:9901",
        "METAPROXY_CONTAINER_CREDENTIALS_PATH": secret,
        "METAPROXY_LIFECYCLE_TOKEN": env_of(sidecar)["METAPROXY_LIFECYCLE_TOKEN"],
        "METAPROXY_LINK_LOCAL_CHECK": "true",
        "METAPROXY_IMDS_TOKEN_KEY_FILE": "/var/run/metaproxy/state/imds-token.key",
        "METAPROXY_LOG_FORMAT": "json",
        "METAPROXY_HOST_METADATA_ALLOW": ",".join(DEFAULT_NODE_METADATA),
    }
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9901}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9901}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9901}
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert set(sidecar["resources"]) == {"requests", "limits"}

    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    token = volumes["metaproxy-identity"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "metaproxy-broker", "expirationSeconds": 3600, "path": "token"}
    assert volumes["metaproxy-state"]["emptyDir"]["medium"] == "Memory"
    assert "metaproxy-auth" not in volumes  # the relative URI needs no token
    assert volumes["metaproxy-broker-ca"]["configMap"]["name"] == "metaproxy-broker-ca"
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert set(mounts) == {"/var/run/secrets/metaproxy", STATE_DIR, "/etc/metaproxy/ca"}
    assert not mounts[STATE_DIR].get("readOnly", False)

    app = patched["spec"]["containers"][0]
    assert env_of(app) == with_secret(APP_ENV, secret)
    assert "volumeMounts" not in app  # the state volume is the sidecar's alone
    lifecycle_token = env_of(sidecar)["METAPROXY_LIFECYCLE_TOKEN"]
    assert len(lifecycle_token) == 32 and lifecycle_token not in secret
    assert app["lifecycle"] == {
        "preStop": {
            "httpGet": {
                "path": "/lifecycle/terminate",
                "port": 9901,
                "httpHeaders": [{"name": "X-Metaproxy-Lifecycle-Token", "value": lifecycle_token}],
            }
        }
    }
    assert patched["metadata"]["annotations"] == {
        INJECTED_ANNOTATION: "true",
        LINK_LOCAL_ANNOTATION: "cni",
    }
    assert kubernetes_validate.validate(patched, "1.30", strict=True) == "1.30"


def test_off_mode_gives_a_loopback_full_uri_the_token_file_and_the_imds_endpoint() -> None:
    """Without link-local addresses the apps get FULL_URI on loopback with the same secret path
    (the one host every SDK accepts), the token file and the IMDS endpoint; no CNI annotation."""
    pod = labelled_pod()
    patched = apply_patch(pod, build_patch(pod, OFF, new_secret=token))
    sidecar = patched["spec"]["initContainers"][0]
    app = patched["spec"]["containers"][0]
    assert env_of(app) == OFF_APP_ENV
    assert env_of(sidecar)["METAPROXY_AUTHORIZATION_TOKEN_FILE"] == f"{AUTH_DIR}/token"
    assert app["volumeMounts"] == [
        {"name": "metaproxy-auth", "mountPath": AUTH_DIR, "readOnly": True}
    ]
    assert patched["metadata"]["annotations"] == {INJECTED_ANNOTATION: "true"}
    assert kubernetes_validate.validate(patched, "1.30", strict=True) == "1.30"


def test_init_container_mode_adds_net_admin_setup_before_the_sidecar() -> None:
    """init-container mode: an init container with NET_ADMIN (and nothing else) prepares the
    namespace first; the sidecar follows; the apps get the relative URI as with the plugin."""
    pod = labelled_pod(initContainers=[{"name": "migrate", "image": "migrate:1"}])
    patched = apply_patch(pod, build_patch(pod, INIT, new_secret=token))
    setup, sidecar, migrate = patched["spec"]["initContainers"]
    assert (setup["name"], sidecar["name"], migrate["name"]) == (
        LINK_LOCAL_CONTAINER,
        SIDECAR_NAME,
        "migrate",
    )
    assert setup["args"][:2] == ["link-local", "setup"]
    assert "--node-metadata" in setup["args"]
    assert "restartPolicy" not in setup  # runs to completion before the sidecar starts
    assert setup["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert setup["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(migrate) == APP_ENV
    assert LINK_LOCAL_ANNOTATION not in patched["metadata"]["annotations"]
    assert kubernetes_validate.validate(patched, "1.30", strict=True) == "1.30"


def test_every_pod_gets_its_own_secret() -> None:
    """Two pods never share a secret path: it is what keeps one pod out of another's."""
    pod = labelled_pod()
    secrets = {secret_of(apply_patch(pod, build_patch(pod, SETTINGS))) for _ in range(50)}
    assert len(secrets) == 50


def test_an_app_with_its_own_pre_stop_hook_keeps_it() -> None:
    """One preStop per container: an app's own hook stays; the others get the sidecar's."""
    own = {"exec": {"command": ["/bin/drain"]}}
    pod = labelled_pod(
        containers=[
            {"name": "a", "image": "a:1", "lifecycle": {"preStop": own}},
            {"name": "b", "image": "b:1", "lifecycle": {"postStart": {"exec": {"command": ["x"]}}}},
        ]
    )
    a, b = apply_patch(pod, build_patch(pod, SETTINGS, new_secret=token))["spec"]["containers"]
    assert a["lifecycle"] == {"preStop": own}
    assert b["lifecycle"]["preStop"]["httpGet"]["path"] == "/lifecycle/terminate"
    assert "postStart" in b["lifecycle"]


@pytest.mark.parametrize("name", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_a_pod_that_chose_its_region_keeps_it(name: str) -> None:
    """A container that sets either region variable gets neither from the webhook."""
    pod = labelled_pod(
        containers=[
            {"name": "app", "image": "app:1", "env": [{"name": name, "value": "ap-south-1"}]}
        ]
    )
    app = apply_patch(pod, build_patch(pod, SETTINGS, new_secret=token))["spec"]["containers"][0]
    assert env_of(app) == {name: "ap-south-1", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": SECRET}


def test_existing_arrays_are_appended_to_and_sidecar_goes_first() -> None:
    """Existing init containers, volumes, env and mounts are kept; the sidecar is first."""
    pod = labelled_pod(
        initContainers=[{"name": "migrate", "image": "migrate:1"}],
        containers=[
            {
                "name": "web",
                "image": "web:1",
                "env": [{"name": "AWS_EC2_METADATA_SERVICE_ENDPOINT", "value": "http://x/"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            },
            {"name": "worker", "image": "worker:1", "env": [{"name": "MODE", "value": "batch"}]},
        ],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    pod["metadata"]["annotations"] = {"team": "payments", "metaproxy.io/role": "orders-reader"}
    patched = apply_patch(pod, build_patch(pod, OFF, new_secret=token))
    spec = patched["spec"]

    assert [c["name"] for c in spec["initContainers"]] == [SIDECAR_NAME, "migrate"]
    assert env_of(spec["initContainers"][0])["METAPROXY_ROLE"] == "orders-reader"
    assert env_of(spec["initContainers"][1]) == OFF_APP_ENV
    web, worker = spec["containers"]
    assert env_of(web)["AWS_EC2_METADATA_SERVICE_ENDPOINT"] == "http://x/"  # kept, not doubled
    assert [e["name"] for e in web["env"]].count("AWS_EC2_METADATA_SERVICE_ENDPOINT") == 1
    assert (
        env_of(web)["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        == OFF_APP_ENV["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    )
    assert env_of(worker) == {"MODE": "batch", **OFF_APP_ENV}
    assert [m["name"] for m in web["volumeMounts"]] == ["data", "metaproxy-auth"]
    assert [v["name"] for v in spec["volumes"]] == [
        "data",
        "metaproxy-identity",
        "metaproxy-state",
        "metaproxy-auth",
        "metaproxy-broker-ca",
    ]
    assert patched["metadata"]["annotations"] == {
        "team": "payments",
        "metaproxy.io/role": "orders-reader",
        INJECTED_ANNOTATION: "true",
    }
    assert kubernetes_validate.validate(patched, "1.30", strict=True) == "1.30"


def test_patch_paths_escape_json_pointer_tokens() -> None:
    """The annotation key's `/` is written `~1` in the patch path."""
    pod = labelled_pod()
    pod["metadata"]["annotations"] = {"a~b/c": "kept"}
    patch = build_patch(pod, SETTINGS)
    assert patch[0]["path"] == "/metadata/annotations/metaproxy.io~1injected"
    assert apply_patch(pod, patch)["metadata"]["annotations"] == {
        "a~b/c": "kept",
        INJECTED_ANNOTATION: "true",
        LINK_LOCAL_ANNOTATION: "cni",
    }


async def test_annotated_pod_is_injected(client: Any) -> None:
    """The inject marker also works as an annotation."""
    pod = make_pod(annotations={"metaproxy.io/inject": "true"})
    _, body = await post_review(client, review(pod))
    patched = apply_patch(pod, decoded_patch(body["response"]))
    assert patched["spec"]["initContainers"][0]["name"] == SIDECAR_NAME


@pytest.mark.parametrize(
    "pod",
    [
        make_pod(),
        make_pod(labels={"app": "orders"}),
        make_pod(labels={"metaproxy.io/inject": "false"}),
    ],
    ids=["no-labels", "other-labels", "inject-false"],
)
async def test_pod_not_asking_for_injection_is_allowed_unchanged(
    client: Any, pod: dict[str, Any]
) -> None:
    """A pod without the inject marker is allowed with no patch."""
    status, body = await post_review(client, review(pod))
    assert status == 200
    assert body["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


async def test_already_injected_pod_gets_no_patch(client: Any) -> None:
    """Injecting twice is a no-op: a pod that has the sidecar is allowed unchanged."""
    pod = labelled_pod()
    _, first = await post_review(client, review(pod))
    injected = apply_patch(pod, decoded_patch(first["response"]))
    status, second = await post_review(client, review(injected))
    assert status == 200
    assert second["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


async def test_conflicting_pod_is_denied_with_reason(client: Any) -> None:
    """A pod whose volume names collide with the sidecar's is denied, saying why."""
    pod = labelled_pod(volumes=[{"name": "metaproxy-state", "emptyDir": {}}])
    status, body = await post_review(client, review(pod))
    assert status == 200
    response = body["response"]
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 422
    assert "metaproxy-state" in response["status"]["message"]


async def test_bad_role_annotation_is_denied(client: Any) -> None:
    """A role annotation that is not an IAM role name or ARN is refused, not passed on."""
    pod = labelled_pod()
    pod["metadata"]["annotations"] = {"metaproxy.io/role": "orders reader\n"}
    _, body = await post_review(client, review(pod))
    assert body["response"]["allowed"] is False
    assert "metaproxy.io/role" in body["response"]["status"]["message"]


def _wrong_api_version() -> dict[str, Any]:
    body = review(labelled_pod())
    body["apiVersion"] = "admission.k8s.io/v1beta1"
    return body


def _without_uid() -> dict[str, Any]:
    body = review(labelled_pod())
    del body["request"]["uid"]
    return body


def _deployment() -> dict[str, Any]:
    body = review(labelled_pod())
    body["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    return body


def _object_not_pod() -> dict[str, Any]:
    return review(["not", "a", "pod"])


def _containers_not_list() -> dict[str, Any]:
    return review(labelled_pod(containers={"name": "app"}))


MALFORMED: dict[str, Any] = {
    "not-json": b"{not json",
    "json-array": [1, 2, 3],
    "wrong-kind": {"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": {"uid": "x"}},
    "wrong-api-version": _wrong_api_version(),
    "missing-uid": _without_uid(),
    "request-not-object": {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": "x",
    },
    "kind-deployment": _deployment(),
    "object-not-pod": _object_not_pod(),
    "containers-not-list": _containers_not_list(),
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "huge-body": json.dumps(
        {**review(labelled_pod()), "padding": "x" * (1024 * 1024 + 1)}
    ).encode(),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_review_is_400_json_and_webhook_keeps_serving(
    client: Any, body: Any
) -> None:
    """A malformed review is answered 400 with a JSON error; the next valid one still works."""
    status, error = await post_review(client, body)
    assert status == 400
    assert error["code"] == "BadRequest"
    assert error["message"] and error["message"] != "bad request"  # says what was wrong
    assert error["request_id"]
    status, ok = await post_review(client, review(labelled_pod()))
    assert status == 200
    assert ok["response"]["allowed"] is True


async def test_non_create_operations_are_allowed_unchanged(client: Any) -> None:
    """Only pod creation is mutated; an UPDATE passes through."""
    body = review(labelled_pod())
    body["request"]["operation"] = "UPDATE"
    status, answer = await post_review(client, body)
    assert status == 200
    assert answer["response"] == {"uid": body["request"]["uid"], "allowed": True}


async def test_healthz(client: Any) -> None:
    """The health endpoint answers 200."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


CLI = (
    "import argparse, sys\n"
    "from metaproxy.webhook import cli\n"
    "parser = argparse.ArgumentParser()\n"
    "cli.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


@contextlib.contextmanager
def running_webhook(
    work: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """`metaproxy webhook` as a real process on a loopback port the kernel picks (its ready
    file says which); SIGTERM at the end.

    The process's stderr is appended to the yielded list once it has exited.
    """
    stderr: list[str] = []
    ready = work / "webhook.ready.json"
    command = [
        sys.executable,
        "-c",
        CLI,
        "webhook",
        "--listen",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        "--image",
        SETTINGS.image,
        "--broker-url",
        SETTINGS.broker_url,
        "--log-format",
        "json",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        try:
            deadline = time.monotonic() + 20
            while not ready.exists():
                assert process.poll() is None, "webhook exited early"
                assert time.monotonic() < deadline, "webhook did not start"
                time.sleep(0.05)
            port = urllib.parse.urlsplit(json.loads(ready.read_text())["url"]).port
            assert port is not None
            yield process, port, stderr
        finally:
            process.terminate()
            stderr.append(process.communicate(timeout=10)[1])


def post_review_sync(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/mutate",
        data=json.dumps(review(labelled_pod())).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5, context=context) as answer:
        result: dict[str, Any] = json.loads(answer.read())["response"]
        return result


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    """`metaproxy webhook` as a real process answers reviews and exits 0 on SIGTERM."""
    with running_webhook(tmp_path) as (process, port, stderr):
        response = post_review_sync(f"http://127.0.0.1:{port}")
        assert response["allowed"] is True
        assert response["patchType"] == "JSONPatch"
    assert process.returncode == 0
    assert "webhook serving on http://127.0.0.1" in stderr[0]


def write_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as the API server would be given in caBundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_cli_serves_tls_and_reloads_certificate_on_sighup(tmp_path: Path) -> None:
    """With --tls-cert/--tls-key it serves HTTPS, and SIGHUP picks up a rotated certificate."""
    cert_file, key_file = write_certificate(tmp_path, "first")
    first = ssl.create_default_context(cafile=str(cert_file))
    with running_webhook(tmp_path, "--tls-cert", str(cert_file), "--tls-key", str(key_file)) as (
        process,
        port,
        _,
    ):
        url = f"https://127.0.0.1:{port}"
        assert post_review_sync(url, first)["allowed"] is True

        write_certificate(tmp_path, "second")
        second = ssl.create_default_context(cafile=str(cert_file))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert post_review_sync(url, second)["allowed"] is True
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "rotated certificate not served"
                time.sleep(0.1)
        with pytest.raises(urllib.error.URLError):
            post_review_sync(url, first)  # the old certificate is gone
    assert process.returncode == 0


def test_cli_refuses_plain_http_broker_url() -> None:
    """The sidecar must verify the broker, so a non-https broker URL is a config error."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "metaproxy",
            "webhook",
            "--image",
            "x",
            "--broker-url",
            "http://broker:8443",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "https://" in result.stderr


async def test_host_network_pod_is_refused_with_a_reason(client: Any) -> None:
    """A hostNetwork pod asking for injection is denied: its credentials would be on the node's
    loopback. The AdmissionReview response says why."""
    pod = labelled_pod(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    status, body = await post_review(client, review(pod))
    assert status == 200
    response = body["response"]
    assert (response["allowed"], response["status"]["code"]) == (False, 422)
    assert "patch" not in response
    assert "hostNetwork" in response["status"]["message"]
    status, body = await post_review(client, review(labelled_pod(hostNetwork=False)))
    assert body["response"]["allowed"] is True  # hostNetwork: false is an ordinary pod
