"""What every application container of an injected pod gets: the environment that points its
SDKs at the sidecar, and the preStop hook that warns the sidecar of the pod's end.

The environment must work for every SDK since 2017 with no other setting,
old ones included (botocore 1.29, AWS CLI 2.9, aws-sdk-go 1.44, Ruby aws-sdk-core 3.168 ignore
`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`), and no request may get credentials without the pod's
secret (docs/compatibility.md has the table of clients and the path each takes):

- **link-local** (`cni`, or `init-container` where the CNI cannot change): the pod's network
  namespace holds 169.254.169.254, 169.254.170.2 and 169.254.170.23 (and their IPv6 twins),
  redirected to this pod's sidecar, never the node's IMDS. The apps get ECS's
  `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` with a secret path: every SDK since 2016 follows it
  with no header. Nothing else: with FULL_URI set as well, aws-sdk-go and aws-sdk-go-v2 < 1.18
  take FULL_URI and the JS SDK v3 warns on every client. Tools that hard-code 169.254.169.254
  (s3cmd, ec2-metadata, OpenTelemetry, cloud-init) reach the sidecar.
- **off**: nothing in the namespace changes. The apps get a loopback `FULL_URI` carrying the
  same secret path (the one host every SDK accepts), the token file (object_store reads
  FULL_URI only with it), and `AWS_EC2_METADATA_SERVICE_ENDPOINT`. Clients that hard-code the
  IMDS address, or read no FULL_URI and ignore the endpoint's port (Ruby 3.168), are not served.

The secret path is in the pod's spec, readable by whoever may read the pod: it is only usable
from inside the pod's network namespace (the sidecar listens on loopback), as ECS's relative
URI is usable only from inside the task.
"""

from __future__ import annotations

from typing import Any

from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT
from metaproxy.webhook.settings import AUTH_DIR, InjectionSettings, PodSecrets

REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def app_environment(settings: InjectionSettings, credentials_path: str) -> list[tuple[str, str]]:
    """The variables every application container gets, in order."""
    if settings.link_local == "off":
        env = [
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                f"http://127.0.0.1:{CONTAINER_PORT}{credentials_path}",
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", f"{AUTH_DIR}/token"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{IMDS_PORT}/"),
        ]
    else:
        env = [("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", credentials_path)]
    if settings.region:
        # The node's region, as the IRSA webhook sets it: SDKs that never read it from IMDS.
        env += [(name, settings.region) for name in REGION_VARIABLES]
    return env


LIFECYCLE_PATH = "/lifecycle/terminate"
LIFECYCLE_HEADER = "X-Metaproxy-Lifecycle-Token"


def pre_stop_hook(settings: InjectionSettings, pod: PodSecrets) -> dict[str, Any]:
    """Kubernetes stops a native sidecar only after the apps have exited, so the sidecar's own
    SIGTERM comes too late to warn them: each app's preStop hook tells the sidecar first, which
    then serves `spot/instance-action` (and holds the hook for the notice period)."""
    return {
        "httpGet": {
            "path": LIFECYCLE_PATH,
            "port": settings.admin_port,
            "httpHeaders": [{"name": LIFECYCLE_HEADER, "value": pod.lifecycle_token}],
        }
    }
