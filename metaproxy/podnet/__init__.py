"""The metadata addresses inside a pod's (or task's) own network namespace.

Clients that hard-code `169.254.169.254` (s3cmd, cloud-init, ec2-metadata, Fluent Bit) must reach
the pod's own sidecar, never the node's IMDS. This package puts the link-local metadata addresses
on the namespace's `lo` and redirects their port 80 to the sidecar's loopback ports with NAT, in
three ways that share one implementation (`addresses.prepare`, `release`, `check`):

- `metaproxy-cni`, a chained CNI plugin the container runtime runs for every pod (`cni.py`);
- `metaproxy link-local setup|check`, an opt-in init container for clusters that cannot change
  their CNI configuration (`cli.py`);
- `metaproxy netns attach|detach`, for platforms that name namespaces with `ip netns`.

It runs on nodes and in init containers, so it uses the standard library only: a small
rtnetlink client (`netlink.py`), `setns(2)` through ctypes (`namespace.py`), and the `iptables`
binaries for the redirect (`redirect.py`).

This module holds only what other parts (the webhook) need to agree with the plugin on, so
importing it costs nothing.
"""

from __future__ import annotations

# The pod annotation that selects the CNI plugin for a pod: the webhook sets it on pods it injects
# a sidecar into, and the plugin acts only on pods that carry it (with the default `"pods":
# "annotated"`). Any other value, or no annotation, leaves the pod as it is today.
LINK_LOCAL_ANNOTATION = "metaproxy.io/link-local"
LINK_LOCAL_CNI = "cni"

# Where the sidecar listens, on 127.0.0.1 and ::1 only, and where the namespace's redirect sends
# the metadata addresses' port 80: IMDS (169.254.169.254, fd00:ec2::254) and container
# credentials (169.254.170.2, 169.254.170.23, fd00:ec2::23). Not port 80 itself: a socket on
# 169.254.169.254:80 makes an application's bind of 0.0.0.0:80 in the same pod fail.
IMDS_PORT = 8182
CONTAINER_PORT = 8181
MAX_PORT = 65535  # either may be set (CNI imdsPort/containerPort, --imds-port): 1 to this
