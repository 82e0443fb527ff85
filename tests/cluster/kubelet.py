"""A kubelet of our own: a Pod spec played as a podman pod, field by field as the kubelet does.

`podman kube play` cannot play what the webhook makes: podman 4.3 refuses probes on init
containers, waits for every init container to exit (a native sidecar never does), turns an
emptyDir into a host-wide named volume and has no projected service-account tokens. So this
plays the spec itself:

Field by field:

- **The pod**: `pod create --network NET` (its infra container's start runs CNI ADD);
  `hostAliases` and the cluster DNS names the test gives become `--add-host`.
- **`initContainers`**, in order: each runs to exit 0 before the next, except a native sidecar
  (`restartPolicy: Always`), which keeps running while the next waits for its startupProbe.
  Then the `containers`, in order.
- **`command` / `args`**: `--entrypoint` (JSON) / the command's arguments, with `$(VAR)` expanded
  from the container's env. **`env`** (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`):
  an `--env-file`, 0600, in the pod's directory.
- **Identity**: `runAsUser`/`runAsGroup` → `--user UID:GID`; `fsGroup` and `supplementalGroups`
  → `--group-add`. `runAsNonRoot` is checked against the uid the container would run as, the
  image's `USER` included, and a root or non-numeric one is refused, as the kubelet refuses it.
- **`readOnlyRootFilesystem`** → `--read-only --read-only-tmpfs=false` (podman would otherwise
  mount writable /tmp, /var/tmp and /run). **`allowPrivilegeEscalation: false`** →
  `no-new-privileges`; **`capabilities`** → `--cap-drop`, `--cap-add`.
- **`resources.limits.memory`** → `--memory`. CPU limits are left out: this machine's two
  shared cores are not a node's.
- **Volumes**: `secret`, `configMap` and `projected` become files in the pod's directory with
  the volume's modes and group `fsGroup`, mounted read-only; a `serviceAccountToken` source is
  minted by the cluster's signer for the pod's service account. An `emptyDir` is a directory of
  the pod's, 0777 (group `fsGroup` and setgid when set).
- **Probes** (`httpGet`, `tcpSocket`, `exec`): `probe()` runs them from the node to the pod's
  address (HTTPS unverified, as the kubelet does); podman's own health checks need systemd.
- **Deletion**: the app containers' `preStop` hooks, then SIGTERM with
  `terminationGracePeriodSeconds`, app containers before sidecars (sidecars in reverse order),
  then the pod.

Images are named by the spec (`registry.example.com/metaproxy:0.1.0`) and mapped to the local
tags the test built; a name without a mapping is an error, never a pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.node import Node, unverified_tls
from tests.cluster.podman import PodmanError
from tests.podlab import socket_in

TokenMinter = Callable[[str, str, str, str, int], str]  # namespace, account, pod, audience, ttl
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")
_BINARY = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
DEFAULT_GRACE = 30
DEFAULT_PROBE_TIMEOUT = 1
INIT_TIMEOUT = 120


class KubeletError(RuntimeError):
    """The pod could not be started as its spec says (the kubelet's CreateContainerConfigError,
    a failed init container, a startup probe that never passed)."""


@dataclass
class ApiObjects:
    """What the API server holds that pods refer to, and the cluster's token signer."""

    secrets: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    mint_token: TokenMinter | None = None


@dataclass
class PlayedPod:
    name: str
    namespace: str
    spec: dict[str, Any]
    podman_name: str
    directory: Path
    ip: str = ""
    containers: dict[str, str] = field(default_factory=dict)  # spec name → podman name
    sidecars: list[str] = field(default_factory=list)  # native sidecars, in start order
    apps: list[str] = field(default_factory=list)
    deleted: bool = False

    def container_spec(self, name: str) -> dict[str, Any]:
        for key in ("initContainers", "containers"):
            for container in self.spec.get(key) or []:
                if container["name"] == name:
                    found: dict[str, Any] = container
                    return found
        raise KeyError(name)


def expand(text: str, values: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)`: replaced when VAR is defined, kept as written otherwise; `$$` → `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return values.get(match.group(1), match.group(0))

    return _VARIABLE.sub(replace, text)


def quantity_bytes(quantity: str) -> int:
    match = _QUANTITY.match(quantity)
    if match is None:
        raise KubeletError(f"unsupported memory quantity {quantity!r}")
    return int(match.group(1)) * _BINARY[match.group(2) or ""]


def _effective(pod_context: Mapping[str, Any], context: Mapping[str, Any], key: str) -> Any:
    return context.get(key, pod_context.get(key))


class Kubelet:
    def __init__(
        self,
        node: Node,
        objects: ApiObjects,
        images: Mapping[str, str],
        directory: Path,
        run_label: str,
    ) -> None:
        self.node = node
        self.podman = node.podman
        self.objects = objects
        self.images = dict(images)
        self.directory = directory
        self.run_label = run_label
        self._image_users: dict[str, str] = {}

    # --- the pod -----------------------------------------------------------------------------

    async def play(
        self, pod: Mapping[str, Any], network: str, hosts: Mapping[str, str] | None = None
    ) -> PlayedPod:
        """Start the pod: its network, its init containers in order, then its containers."""
        metadata, spec = pod["metadata"], json.loads(json.dumps(pod["spec"]))
        namespace = metadata.get("namespace", "default")
        played = PlayedPod(
            name=metadata["name"],
            namespace=namespace,
            spec=spec,
            podman_name=f"{self.run_label}-{namespace}-{metadata['name']}",
            directory=self.directory / f"{namespace}-{metadata['name']}",
        )
        played.directory.mkdir(parents=True)
        aliases = dict(hosts or {})
        for entry in spec.get("hostAliases") or []:
            aliases.update(dict.fromkeys(entry["hostnames"], entry["ip"]))
        await self._podman(
            "pod",
            "create",
            f"--name={played.podman_name}",
            f"--network={'host' if spec.get('hostNetwork') else network}",
            f"--hostname={played.name}",
            f"--label=metaproxy.test/run={self.run_label}",
            *(f"--add-host={name}:{address}" for name, address in sorted(aliases.items())),
        )
        await self._podman("pod", "start", played.podman_name)
        infra = (await self._inspect("pod", played.podman_name))["InfraContainerID"]
        networks = (await self._inspect("container", infra))["NetworkSettings"]["Networks"]
        played.ip = "127.0.0.1" if spec.get("hostNetwork") else networks[network]["IPAddress"]
        self._lay_out_volumes(played)
        for container in spec.get("initContainers") or []:
            name = await self._create(played, metadata, container)
            if container.get("restartPolicy") == "Always":
                played.sidecars.append(container["name"])
                await self._podman("start", name)
                if "startupProbe" in container:
                    await self._wait_probe(played, container["name"], container["startupProbe"])
            else:
                await self._run_to_completion(played, container["name"], name)
        for container in spec["containers"]:
            name = await self._create(played, metadata, container)
            played.apps.append(container["name"])
            await self._podman("start", name)
        return played

    async def delete(self, played: PlayedPod) -> None:
        """As the kubelet deletes a pod: preStop hooks, SIGTERM and the grace period, apps
        before sidecars; the containers' logs are kept in the pod's directory."""
        grace = int(played.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE))
        hooks = [
            self._pre_stop(played, name, spec["lifecycle"]["preStop"])
            for name in played.apps
            if "preStop" in (spec := played.container_spec(name)).get("lifecycle", {})
        ]
        await asyncio.gather(*hooks)
        apps = [played.containers[name] for name in played.apps]
        if apps:
            await self._podman("stop", f"--time={grace}", *apps, timeout=grace + 30)
        for name in reversed(played.sidecars):
            await self._podman(
                "stop", f"--time={grace}", played.containers[name], timeout=grace + 30
            )
        await self.save_logs(played)
        await self._podman("pod", "rm", "--force", played.podman_name, timeout=120)
        played.deleted = True

    async def save_logs(self, played: PlayedPod) -> None:
        """Each container's log as `NAME.log` in the pod's directory, where the session's
        secret scan reads it (with the pod's emptyDirs: audit segments, Valkey's AOF)."""
        for name, podman_name in played.containers.items():
            logs = await self._podman("logs", podman_name, check=False)
            (played.directory / f"{name}.log").write_text(logs.stdout + logs.stderr)

    # --- containers ----------------------------------------------------------------------------

    async def _create(
        self, played: PlayedPod, metadata: Mapping[str, Any], container: Mapping[str, Any]
    ) -> str:
        name = f"{played.podman_name}-{container['name']}"
        played.containers[container["name"]] = name
        argv = await self.create_argv(played, metadata, container, name)
        await self._podman(*argv)
        return name

    async def create_argv(
        self,
        played: PlayedPod,
        metadata: Mapping[str, Any],
        container: Mapping[str, Any],
        name: str,
    ) -> list[str]:
        spec = played.spec
        image = self.images.get(container["image"])
        if image is None:
            raise KubeletError(
                f"no local image for {container['image']} (this kubelet never pulls)"
            )
        pod_context = spec.get("securityContext") or {}
        context = container.get("securityContext") or {}
        argv = [
            "create",
            f"--pod={played.podman_name}",
            f"--name={name}",
            "--pull=never",
            f"--label=metaproxy.test/run={self.run_label}",
            f"--stop-timeout={spec.get('terminationGracePeriodSeconds', DEFAULT_GRACE)}",
        ]
        argv += await self._identity(pod_context, context, image, container["name"])
        if context.get("readOnlyRootFilesystem"):
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if context.get("allowPrivilegeEscalation") is False:
            argv.append("--security-opt=no-new-privileges")
        capabilities = context.get("capabilities") or {}
        argv += [f"--cap-drop={c}" for c in capabilities.get("drop", [])]
        argv += [f"--cap-add={c}" for c in capabilities.get("add", [])]
        if context.get("privileged"):
            argv.append("--privileged")
        seccomp = _effective(pod_context, context, "seccompProfile") or {}
        if seccomp.get("type") == "Unconfined":
            argv.append("--security-opt=seccomp=unconfined")
        memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if memory:
            argv.append(f"--memory={quantity_bytes(memory)}")
        env = self._environment(played, metadata, container)
        env_file = played.directory / f"{container['name']}.env"
        env_file.touch(mode=0o600)
        env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        argv.append(f"--env-file={env_file}")
        for mount in container.get("volumeMounts") or []:
            argv.append(self._mount(played, mount))
        if "workingDir" in container:
            argv.append(f"--workdir={container['workingDir']}")
        if "command" in container:
            argv.append(
                f"--entrypoint={json.dumps([expand(c, env) for c in container['command']])}"
            )
        argv.append(image)
        argv += [expand(a, env) for a in container.get("args") or []]
        return argv

    async def _identity(
        self, pod_context: Mapping[str, Any], context: Mapping[str, Any], image: str, name: str
    ) -> list[str]:
        uid = _effective(pod_context, context, "runAsUser")
        gid = _effective(pod_context, context, "runAsGroup")
        if uid is None:
            user = await self._image_user(image)
            uid_text, _, gid_text = user.partition(":")
            if not uid_text.isdigit():
                if _effective(pod_context, context, "runAsNonRoot"):
                    raise KubeletError(
                        f"container {name}: image has non-numeric user ({user or 'root'}), "
                        "cannot verify user is non-root"
                    )
                uid_text = "0"
            uid = int(uid_text)
            gid = gid if gid is not None else (int(gid_text) if gid_text.isdigit() else None)
        if _effective(pod_context, context, "runAsNonRoot") and uid == 0:
            raise KubeletError(f"container {name} has runAsNonRoot and image will run as root")
        argv = [f"--user={uid}" if gid is None else f"--user={uid}:{gid}"]
        groups = list(pod_context.get("supplementalGroups") or [])
        if "fsGroup" in pod_context:
            groups.append(pod_context["fsGroup"])
        argv += [f"--group-add={g}" for g in groups]
        return argv

    async def _image_user(self, image: str) -> str:
        if image not in self._image_users:
            config = (await self._inspect("image", image)).get("Config") or {}
            self._image_users[image] = str(config.get("User") or "")
        return self._image_users[image]

    def _environment(
        self, played: PlayedPod, metadata: Mapping[str, Any], container: Mapping[str, Any]
    ) -> dict[str, str]:
        values: dict[str, str] = {}
        fields = {
            "metadata.name": played.name,
            "metadata.namespace": played.namespace,
            "status.podIP": played.ip,
            "spec.serviceAccountName": played.spec.get("serviceAccountName", "default"),
        }
        for entry in container.get("env") or []:
            source = entry.get("valueFrom")
            if source is None:
                values[entry["name"]] = expand(entry.get("value", ""), values)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.objects.secrets[(played.namespace, ref["name"])]
                values[entry["name"]] = secret[ref["key"]].decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                values[entry["name"]] = self.objects.config_maps[(played.namespace, ref["name"])][
                    ref["key"]
                ]
            elif "fieldRef" in source:
                values[entry["name"]] = fields[source["fieldRef"]["fieldPath"]]
            else:
                raise KubeletError(f"unsupported env source {sorted(source)}")
        return values

    # --- volumes -------------------------------------------------------------------------------

    def _lay_out_volumes(self, played: PlayedPod) -> None:
        context = played.spec.get("securityContext") or {}
        group = context.get("fsGroup")
        for volume in played.spec.get("volumes") or []:
            target = played.directory / "volumes" / volume["name"]
            target.mkdir(parents=True)
            if "emptyDir" in volume:
                if group is not None:
                    os.chown(target, 0, group)
                target.chmod(0o2777 if group is not None else 0o777)
                continue
            files = self._volume_files(played, volume)
            for relative, (content, mode) in files.items():
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                if group is not None:
                    os.chown(path, 0, group)
                # The kubelet gives fsGroup read access.
                path.chmod(mode | 0o040 if group is not None else mode)

    def _volume_files(
        self, played: PlayedPod, volume: Mapping[str, Any]
    ) -> dict[str, tuple[bytes, int]]:
        namespace = played.namespace
        if "secret" in volume:
            source = volume["secret"]
            data = self.objects.secrets[(namespace, source["secretName"])]
            return _project(data, source, 0o644)
        if "configMap" in volume:
            source = volume["configMap"]
            text = self.objects.config_maps[(namespace, source["name"])]
            return _project({k: v.encode() for k, v in text.items()}, source, 0o644)
        if "projected" in volume:
            files: dict[str, tuple[bytes, int]] = {}
            for item in volume["projected"]["sources"]:
                token = item.get("serviceAccountToken")
                if token is None:
                    raise KubeletError(f"unsupported projected source {sorted(item)}")
                if self.objects.mint_token is None:
                    raise KubeletError("no token signer for a serviceAccountToken volume")
                minted = self.objects.mint_token(
                    namespace,
                    played.spec.get("serviceAccountName", "default"),
                    played.name,
                    token.get("audience", ""),
                    int(token.get("expirationSeconds", 3600)),
                )
                files[token["path"]] = (minted.encode(), 0o600)
            return files
        raise KubeletError(f"unsupported volume {volume['name']}: {sorted(volume)}")

    def _mount(self, played: PlayedPod, mount: Mapping[str, Any]) -> str:
        volume = next(v for v in played.spec["volumes"] if v["name"] == mount["name"])
        source = played.directory / "volumes" / mount["name"]
        if "subPath" in mount:
            source = source / mount["subPath"]
        # Secrets, config maps and tokens are read-only whatever the mount says.
        read_only = mount.get("readOnly") or "emptyDir" not in volume
        return f"--volume={source}:{mount['mountPath']}:{'ro' if read_only else 'rw'}"

    # --- probes and hooks ----------------------------------------------------------------------

    async def probe(self, played: PlayedPod, container: str, probe: Mapping[str, Any]) -> bool:
        """One probe, as the kubelet runs it: True on success."""
        timeout = float(probe.get("timeoutSeconds", DEFAULT_PROBE_TIMEOUT))
        spec = played.container_spec(container)
        if "exec" in probe:
            command = probe["exec"]["command"]
            done = await self._podman(
                "exec", played.containers[container], *command, check=False, timeout=timeout + 5
            )
            return done.returncode == 0
        if "tcpSocket" in probe:
            port = _port(spec, probe["tcpSocket"]["port"])
            return await asyncio.to_thread(self._connects, played.ip, port, timeout)
        get = probe["httpGet"]
        port = _port(spec, get["port"])
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        tls = unverified_tls() if get.get("scheme") == "HTTPS" else None
        try:
            answer = await asyncio.to_thread(
                self.node.request,
                played.ip,
                port,
                get.get("path", "/"),
                headers=headers,
                tls=tls,
                timeout=timeout,
            )
        except OSError:
            return False
        return 200 <= answer.status < 400

    def _connects(self, address: str, port: int, timeout: float) -> bool:
        sock = socket_in(self.node.netns)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    async def wait_ready(self, played: PlayedPod, container: str, timeout: float = 60) -> None:
        """Until the container's readiness probe passes (its first `timeout` seconds)."""
        spec = played.container_spec(container)
        probe = spec.get("readinessProbe") or spec.get("startupProbe")
        if probe is None:
            return
        deadline = time.monotonic() + timeout
        while not await self.probe(played, container, probe):
            await self._fail_if_exited(played, container)
            if time.monotonic() > deadline:
                raise KubeletError(
                    f"{played.name}/{container} not ready within {timeout:g}s:\n"
                    + await self.logs(played, container)
                )
            await asyncio.sleep(0.5)

    async def _wait_probe(
        self, played: PlayedPod, container: str, probe: Mapping[str, Any]
    ) -> None:
        period = float(probe.get("periodSeconds", 10))
        attempts = int(probe.get("failureThreshold", 3))
        for _ in range(attempts):
            if await self.probe(played, container, probe):
                return
            await self._fail_if_exited(played, container)
            await asyncio.sleep(min(period, 1.0))
        raise KubeletError(
            f"{played.name}/{container}: startup probe failed {attempts} times:\n"
            + await self.logs(played, container)
        )

    async def _fail_if_exited(self, played: PlayedPod, container: str) -> None:
        state = (await self._inspect("container", played.containers[container]))["State"]
        if not state.get("Running"):
            raise KubeletError(
                f"{played.name}/{container} exited {state.get('ExitCode')}:\n"
                + await self.logs(played, container)
            )

    async def _run_to_completion(self, played: PlayedPod, container: str, name: str) -> None:
        await self._podman("start", "--attach", name, check=False, timeout=INIT_TIMEOUT)
        state = (await self._inspect("container", name))["State"]
        if state.get("ExitCode") != 0:
            raise KubeletError(
                f"{played.name}: init container {container} exited {state.get('ExitCode')}:\n"
                + await self.logs(played, container)
            )

    async def _pre_stop(self, played: PlayedPod, container: str, hook: Mapping[str, Any]) -> None:
        if "exec" in hook:
            await self._podman(
                "exec", played.containers[container], *hook["exec"]["command"], check=False
            )
            return
        get = hook["httpGet"]
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        # The hook may name a port of another container of the pod (the sidecar's).
        port = get["port"] if isinstance(get["port"], int) else _pod_port(played, get["port"])
        # The kubelet logs a failed hook and goes on with the termination.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(
                self.node.request, played.ip, port, get.get("path", "/"), headers=headers
            )

    # --- podman --------------------------------------------------------------------------------

    async def logs(self, played: PlayedPod, container: str) -> str:
        done = await self._podman("logs", played.containers[container], check=False)
        return (done.stdout + done.stderr)[-4000:]

    async def exec(
        self, played: PlayedPod, container: str, *command: str, timeout: float = 120
    ) -> tuple[int, str, str]:
        done = await self._podman(
            "exec", played.containers[container], *command, check=False, timeout=timeout
        )
        return done.returncode, done.stdout, done.stderr

    async def pid(self, played: PlayedPod, container: str) -> int:
        return int((await self._inspect("container", played.containers[container]))["State"]["Pid"])

    async def _inspect(self, kind: str, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.podman.inspect, kind, name)

    async def _podman(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        try:
            return await asyncio.to_thread(self.podman.run, *args, check=check, timeout=timeout)
        except PodmanError as exc:
            raise KubeletError(str(exc)) from None

    def remove_everything(self) -> None:
        """Every pod of this run, whatever state it is in (the end of a test, or its failure)."""
        listed = self.podman.run(
            "pod",
            "ps",
            "--format=json",
            f"--filter=label=metaproxy.test/run={self.run_label}",
            check=False,
        )
        for pod in json.loads(listed.stdout or "[]"):
            self.podman.run("pod", "rm", "--force", "--time=2", pod["Id"], check=False)


def _project(
    data: Mapping[str, bytes], source: Mapping[str, Any], default_mode: int
) -> dict[str, tuple[bytes, int]]:
    mode = int(source.get("defaultMode", default_mode))
    items = source.get("items")
    if items is None:
        return {key: (value, mode) for key, value in data.items()}
    return {item["path"]: (data[item["key"]], int(item.get("mode", mode))) for item in items}


def _port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise KubeletError(f"container {container['name']} has no port named {port}")


def _pod_port(played: PlayedPod, port: str) -> int:
    for key in ("initContainers", "containers"):
        for container in played.spec.get(key) or []:
            for declared in container.get("ports") or []:
                if declared.get("name") == port:
                    return int(declared["containerPort"])
    raise KubeletError(f"pod {played.name} has no port named {port}")
