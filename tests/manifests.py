"""The shipped Kubernetes manifests, rendered as `kubectl apply -k` renders them.

`render(overlay, workdir)` does what docs/kubernetes.md asks of an operator, in a copy of
`deploy/kubernetes` under `workdir`: `make-secrets.sh` writes the overlay's secrets with the
keygen commands, a signing key stands in for the cluster's service-account issuer (its JWKS is
the overlay's `cluster-jwks.json`), then `kubectl kustomize` renders the overlay. The objects it
returns are exactly what the overlay applies, so tests that run the processes (the pod test)
take their settings, secrets and keys from them rather than from a copy of their own.

`Rendered.files(...)` and `Rendered.env(...)` give a container's view of them: the files of each
volume it mounts (Secrets, ConfigMaps; emptyDirs as empty folders) and its environment with
`valueFrom` resolved, as the kubelet would give them; `Rendered.service_account_token(...)` a
projected token as the kubelet would mint it for a pod, which the rendered broker accepts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("eks", "single")
MAKE_SECRETS = KUBERNETES / "make-secrets.sh"
METAPROXY = Path(sys.executable).parent / "metaproxy"
# Components and replacements with delimiters need kustomize 5 (kubectl 1.27 and later).
MIN_KUSTOMIZE = (5, 0)
HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}")  # a generated object's name suffix
KUSTOMIZE_TIMEOUT = 60.0

Object = dict[str, Any]


def kustomize_problem() -> str | None:
    """Why `kubectl kustomize` cannot render the overlays here, or None if it can."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl is not installed (it renders the kustomize overlays)"
    result = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=KUSTOMIZE_TIMEOUT,
    )
    version = json.loads(result.stdout or "{}").get("kustomizeVersion", "")
    match = re.fullmatch(r"v(\d+)\.(\d+)\..*", version)
    if match is None or (int(match[1]), int(match[2])) < MIN_KUSTOMIZE:
        return f"kubectl's kustomize {version or '(none)'} is older than v5"
    return None


def kustomize(directory: Path) -> str:
    """`kubectl kustomize DIRECTORY`: the YAML stream `kubectl apply -k` would apply."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=KUSTOMIZE_TIMEOUT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return result.stdout


def generator_names(kustomization_dir: Path) -> set[str]:
    """Names of the Secrets and ConfigMaps this kustomization and its bases generate."""
    names: set[str] = set()
    for path in (kustomization_dir / "kustomization.yaml", KUBERNETES / "base/kustomization.yaml"):
        spec = yaml.safe_load(path.read_text())
        for key in ("secretGenerator", "configMapGenerator"):
            names.update(entry["name"] for entry in spec.get(key, []))
    return names


@dataclass(frozen=True)
class Rendered:
    """One overlay, rendered."""

    overlay: str
    directory: Path  # the overlay's copy: kustomization.yaml, settings.yaml, secrets/
    text: str  # kubectl kustomize's output
    objects: tuple[Object, ...]
    generated: frozenset[str]  # names of generated objects, before their hash suffix
    cluster_key: Path  # signs service-account tokens the broker trusts (the cluster's key)

    def service_account_token(
        self, namespace: str, account: str, pod: str = "app-0", lifetime: int = 3600
    ) -> str:
        """A projected service-account token for a pod, as the kubelet mints it for the
        injected sidecar: the cluster's issuer and key, the audience the broker trusts."""
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from metaproxy.identity.keys import jwk_thumbprint, public_jwk

        environ = self.env("Deployment", "metaproxy-broker", "broker", "broker-0")
        issuer, audience = environ["METAPROXY_TRUST"].split(",")[:2]
        key = load_pem_private_key(self.cluster_key.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        now = int(time.time())
        claims = {
            "aud": [audience],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            },
            "sub": f"system:serviceaccount:{namespace}:{account}",
        }
        kid = jwk_thumbprint(public_jwk(key.public_key()))
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})

    @property
    def secrets(self) -> Path:
        """What make-secrets.sh wrote: the keys behind the Secrets."""
        return self.directory / "secrets"

    @property
    def settings(self) -> dict[str, str]:
        """The overlay's settings.yaml: the values that differ per cluster."""
        data: dict[str, str] = yaml.safe_load((self.directory / "settings.yaml").read_text())[
            "data"
        ]
        return data

    def base_name(self, document: Object) -> str:
        """The object's name as the manifests give it: generated ones without their suffix."""
        name: str = document["metadata"]["name"]
        stem, _, suffix = name.rpartition("-")
        if stem in self.generated and HASH_SUFFIX.fullmatch("-" + suffix):
            return stem
        return name

    def all(self, kind: str) -> list[Object]:
        return [d for d in self.objects if d["kind"] == kind]

    def one(self, kind: str, name: str) -> Object:
        """The object of this kind named `name` (a generated one by its name before the suffix)."""
        matches = [d for d in self.all(kind) if self.base_name(d) == name]
        assert len(matches) == 1, f"{self.overlay}: expected one {kind} {name}, got {len(matches)}"
        return matches[0]

    def by_name(self, kind: str, name: str) -> Object:
        """The object of this kind with exactly this (rendered) name, as a pod refers to it."""
        (match,) = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        return match

    def data(self, kind: str, name: str) -> dict[str, bytes]:
        """A Secret's or ConfigMap's keys and values, decoded; `name` as rendered."""
        document = self.by_name(kind, name)
        # A Secret's data is base64, a ConfigMap's text (its binaryData base64).
        encoded = document.get("data" if kind == "Secret" else "binaryData", {})
        plain = document.get("stringData" if kind == "Secret" else "data", {})
        values = {key: base64.b64decode(value) for key, value in encoded.items()}
        values.update({key: value.encode() for key, value in plain.items()})
        return values

    def container(self, kind: str, name: str, container: str) -> Object:
        spec = self.one(kind, name)["spec"]["template"]["spec"]
        (match,) = [c for c in spec["containers"] if c["name"] == container]
        return dict(match)

    def files(self, kind: str, name: str, container: str) -> dict[str, dict[str, bytes]]:
        """Each mountPath of the container: the files its volume puts there (an emptyDir: none)."""
        pod = self.one(kind, name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts: dict[str, dict[str, bytes]] = {}
        for mount in self.container(kind, name, container).get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" in volume:
                mounts[mount["mountPath"]] = self.data("Secret", volume["secret"]["secretName"])
            elif "configMap" in volume:
                mounts[mount["mountPath"]] = self.data("ConfigMap", volume["configMap"]["name"])
            else:
                mounts[mount["mountPath"]] = {}
        return mounts

    def env(self, kind: str, name: str, container: str, pod_name: str) -> dict[str, str]:
        """The container's environment as the kubelet sets it (`valueFrom` resolved)."""
        environ: dict[str, str] = {}
        for entry in self.container(kind, name, container).get("env", []):
            if "value" in entry:
                environ[entry["name"]] = entry["value"]
                continue
            source = entry["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                environ[entry["name"]] = self.data("Secret", ref["name"])[ref["key"]].decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                environ[entry["name"]] = self.data("ConfigMap", ref["name"])[ref["key"]].decode()
            else:
                assert source["fieldRef"]["fieldPath"] == "metadata.name", source
                environ[entry["name"]] = pod_name
        return environ

    def materialize(
        self, kind: str, name: str, container: str, root: Path, pod_name: str = "pod-0"
    ) -> dict[str, str]:
        """The container's files under `root` (each mountPath below it) and its environment,
        with every value naming a mounted path rewritten to the copy under `root`."""
        mounts = self.files(kind, name, container)
        for mount_path, files in mounts.items():
            target = root / PurePosixPath(mount_path).relative_to("/")
            target.mkdir(parents=True, exist_ok=True)
            for file_name, content in files.items():
                (target / file_name).write_bytes(content)
        environ = self.env(kind, name, container, pod_name)
        return {key: _rooted(value, mounts, root) for key, value in environ.items()}


def _rooted(value: str, mounts: Mapping[str, object], root: Path) -> str:
    """`value` with each mounted path in it (whole, or a comma-separated field) under `root`."""
    fields = value.split(",")
    for index, field in enumerate(fields):
        for mount_path in mounts:
            if field == mount_path or field.startswith(mount_path + "/"):
                fields[index] = str(root) + field
    return ",".join(fields)


def _run(command: list[str], environ: Mapping[str, str] | None = None) -> None:
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=KUSTOMIZE_TIMEOUT,
        env=None if environ is None else {**os.environ, **environ},
    )


def prepare(overlay: str, workdir: Path) -> tuple[Path, Path]:
    """A copy of deploy/kubernetes in `workdir` with the overlay's inputs made as the docs say:
    (the overlay's directory, the private key of the stand-in cluster issuer)."""
    tree = workdir / "kubernetes"
    if not tree.exists():
        shutil.copytree(
            KUBERNETES,
            tree,
            ignore=shutil.ignore_patterns("secrets", "cluster-jwks.json"),
        )
    directory = tree / "overlays" / overlay
    _run(["sh", str(MAKE_SECRETS), str(directory)], {"METAPROXY": str(METAPROXY)})
    # The cluster's service-account signing key: its JWKS is what the operator fetches with
    # `kubectl get --raw /openid/v1/jwks`. RSA and RS256, as kube-apiserver signs.
    key_path = workdir / f"{overlay}-cluster.key"
    (directory / "cluster-jwks.json").write_text(json.dumps(_cluster_key(key_path)))
    return directory, key_path


def _cluster_key(path: Path) -> dict[str, Any]:
    """Write an RSA private key to `path` (0600); its JWKS as the API server publishes it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from metaproxy.fsutil import write_atomically
    from metaproxy.identity.keys import jwk_thumbprint, public_jwk

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomically(path, pem, 0o600)
    jwk = public_jwk(key.public_key())
    return {"keys": [{**jwk, "kid": jwk_thumbprint(jwk), "alg": "RS256", "use": "sig"}]}


def render_directory(overlay: str, directory: Path, cluster_key: Path) -> Rendered:
    """Render an overlay directory already prepared (e.g. one a test edited)."""
    text = kustomize(directory)
    objects = tuple(d for d in yaml.safe_load_all(text) if d is not None)
    return Rendered(
        overlay=overlay,
        directory=directory,
        text=text,
        objects=objects,
        generated=frozenset(generator_names(directory)),
        cluster_key=cluster_key,
    )


def render(overlay: str, workdir: Path) -> Rendered:
    """Prepare the overlay in `workdir` (an empty or shared scratch folder) and render it."""
    directory, cluster_key = prepare(overlay, workdir)
    return render_directory(overlay, directory, cluster_key)


# Rendering every overlay runs make-secrets.sh's keygen commands and kubectl: about a second
# of CPU, which every xdist worker paid again to collect test_deploy_manifests. The controller
# renders once before it starts its workers (`render_for_workers`), and names the folder in
# this variable, which the workers inherit; they read the renders (`rendered_overlays`).
SHARED_RENDERS = "METAPROXY_TEST_RENDERED_MANIFESTS"
_INDEX = "rendered.json"


def render_for_workers(workdir: Path) -> None:
    """Render every overlay into `workdir`, index them there, and name it in the environment
    the xdist workers will inherit."""
    index = {}
    for overlay in OVERLAYS:
        rendered = render(overlay, workdir)
        index[overlay] = {
            "directory": str(rendered.directory),
            "text": rendered.text,
            "cluster_key": str(rendered.cluster_key),
        }
    (workdir / _INDEX).write_text(json.dumps(index))
    os.environ[SHARED_RENDERS] = str(workdir)


def rendered_overlays(workdir: Path) -> dict[str, Rendered]:
    """Every overlay, rendered: read from the controller's renders when it made them, else
    rendered into `workdir` here."""
    shared = os.environ.get(SHARED_RENDERS)
    if not shared or not (Path(shared) / _INDEX).is_file():
        return {overlay: render(overlay, workdir) for overlay in OVERLAYS}
    index = json.loads((Path(shared) / _INDEX).read_text())
    return {
        overlay: Rendered(
            overlay=overlay,
            directory=Path(entry["directory"]),
            text=entry["text"],
            objects=tuple(d for d in yaml.safe_load_all(entry["text"]) if d is not None),
            generated=frozenset(generator_names(Path(entry["directory"]))),
            cluster_key=Path(entry["cluster_key"]),
        )
        for overlay, entry in index.items()
    }
