"""The task's metadata addresses on `lo`, their redirect to the sidecar, and the uplink setting
for node metadata.

`prepare`, `release` and `check` act on the current network namespace (`netns=None`: the init
container) or on the one at a path (`/run/netns/NAME`, CNI_NETNS). They are the one
implementation behind the CNI plugin, `metaproxy link-local` and `metaproxy netns`.

Why `lo`: a /32 (/128) on `lo` lands in the namespace's `local` routing table, which the kernel
consults before any other, so inside the namespace the address is always the pod's own, whatever
default route the pod has, and nothing outside the namespace can reach it (docs/netns.md, "Why
lo"). The sidecar does not listen on it: the nat redirect (`redirect.py`) sends port 80 to its
loopback ports. Without the redirect a client gets "connection refused" from its own namespace,
never the node's IMDS: the addresses are what makes this fail closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from metaproxy.config import (
    CONTAINER_CREDENTIALS_ADDRESS,
    CONTAINER_CREDENTIALS_ADDRESS_V6,
    ECS_CREDENTIALS_ADDRESS,
    IMDS_ADDRESS,
    IMDS_ADDRESS_V6,
)
from metaproxy.podnet import CONTAINER_PORT, IMDS_PORT, MAX_PORT
from metaproxy.podnet.namespace import NamespaceGone, entered, read_sysctl
from metaproxy.podnet.netlink import (
    IFA_F_DADFAILED,
    IFA_F_NODAD,
    IFA_F_TENTATIVE,
    IPV4_DEVCONF_ACCEPT_LOCAL,
    IPInterface,
    Rtnetlink,
)
from metaproxy.podnet.redirect import CHAIN, Iptables, Redirect, find, find_present

TASK_INTERFACE = "lo"
_IMDS = (IMDS_ADDRESS, IMDS_ADDRESS_V6)
_V4 = (IMDS_ADDRESS, ECS_CREDENTIALS_ADDRESS, CONTAINER_CREDENTIALS_ADDRESS)
_V6 = (IMDS_ADDRESS_V6, CONTAINER_CREDENTIALS_ADDRESS_V6)


def _interface(listen: str) -> IPInterface:
    host = listen.rpartition(":")[0].strip("[]")
    return ipaddress.ip_interface(f"{host}/{32 if ':' not in host else 128}")


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


TASK_ADDRESSES_V4: tuple[IPInterface, ...] = tuple(map(_interface, _V4))
TASK_ADDRESSES_V6: tuple[IPInterface, ...] = tuple(map(_interface, _V6))
_PORTS = {_interface(a): _port(a) for a in _V4 + _V6}  # 80, where every SDK connects
_IMDS_ADDRESSES = frozenset(map(_interface, _IMDS))
IPV6_SYSCTLS = Path("/proc/sys/net/ipv6")  # absent when the kernel runs without IPv6


@dataclass(frozen=True, slots=True)
class Prepared:
    """What `prepare` did, for the one log line each caller writes."""

    addresses: tuple[IPInterface, ...]
    redirects: tuple[Redirect, ...]
    accept_local: str | None  # the uplink that now accepts replies from a local source

    def summary(self) -> str:
        parts = [
            ", ".join(map(str, self.addresses)) + f" on {TASK_INTERFACE}",
            f"nat {CHAIN}: " + ", ".join(map(str, self.redirects)),
        ]
        if self.accept_local is not None:
            parts.append(f"accept_local=1 on {self.accept_local}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Released:
    """What `release` removed."""

    addresses: tuple[IPInterface, ...] = ()
    chains: tuple[str, ...] = ()  # the families whose chain was there: "IPv4", "IPv6"

    def summary(self) -> str:
        removed = [", ".join(map(str, self.addresses))] if self.addresses else []
        if self.chains:
            removed.append(f"nat {CHAIN} ({', '.join(self.chains)})")
        return "removed " + ("; ".join(removed) or "nothing")


def ipv6_enabled() -> bool:
    """IPv6 in the current namespace: the kernel has it and `lo` has not had it disabled."""
    if not IPV6_SYSCTLS.is_dir():
        return False
    try:
        return read_sysctl(f"net/ipv6/conf/{TASK_INTERFACE}/disable_ipv6") == "0"
    except OSError:
        return False


def task_addresses() -> tuple[IPInterface, ...]:
    """The addresses for the current namespace: IPv4, and IPv6 where it has IPv6."""
    return TASK_ADDRESSES_V4 + (TASK_ADDRESSES_V6 if ipv6_enabled() else ())


def redirects(
    addresses: Sequence[IPInterface], *, imds_port: int, container_port: int
) -> tuple[Redirect, ...]:
    """IMDS's addresses to `imds_port`, the container-credentials addresses to
    `container_port`."""
    for name, port in (("imds_port", imds_port), ("container_port", container_port)):
        if not 1 <= port <= MAX_PORT:
            raise ValueError(f"{name} {port} is not a TCP port (1 to {MAX_PORT})")
    return tuple(
        Redirect(a, _PORTS[a], imds_port if a in _IMDS_ADDRESSES else container_port)
        for a in addresses
    )


def _versions(addresses: Sequence[IPInterface]) -> tuple[Literal[4, 6], ...]:
    return (4, 6) if any(a.version == 6 for a in addresses) else (4,)


def _of(tables: Iptables, rules: Sequence[Redirect]) -> list[Redirect]:
    return [r for r in rules if r.address.version == tables.version]


def prepare(
    netns: Path | None = None,
    *,
    uplink: str | None = None,
    imds_port: int = IMDS_PORT,
    container_port: int = CONTAINER_PORT,
) -> Prepared:
    """`lo` up with the task addresses (replaced, so a retry after a crash works); port 80 of
    each redirected to the sidecar's loopback port (`imds_port`, `container_port`); and, with
    `uplink`, accept_local=1 on it, so a socket bound to the uplink (SO_BINDTODEVICE) gets the
    node IMDS's replies, whose source address is also local to the pod.

    The addresses go first: should the redirect then fail, clients are refused inside the pod
    rather than reaching the node's IMDS."""
    with entered(netns), Rtnetlink() as rt:
        # Looked up first: a missing uplink or iptables fails the call before anything changed.
        lo = rt.link(TASK_INTERFACE)
        uplink_index = rt.link(uplink).index if uplink is not None else None
        addresses = task_addresses()
        rules = redirects(addresses, imds_port=imds_port, container_port=container_port)
        tables = find(_versions(addresses))
        if not lo.up:
            rt.set_link_up(lo.index)
        for address in addresses:
            # nodad: usable at once rather than "tentative" while duplicate detection runs.
            rt.replace_address(lo.index, address, IFA_F_NODAD if address.version == 6 else 0)
        for family in tables:
            family.apply(_of(family, rules))
        if uplink_index is not None:
            rt.set_ipv4_devconf(uplink_index, IPV4_DEVCONF_ACCEPT_LOCAL, 1)
    return Prepared(addresses, rules, uplink)


def release(netns: Path | None = None) -> Released:
    """Remove the redirect (jump and chain), then the task addresses. Idempotent, and fine when
    the namespace is gone (everything went with it).

    `lo` stays up (the task's loopback must keep working) and accept_local stays as it is: the
    plugin keeps no state to restore it from, and without the addresses it only admits replies
    from addresses local to the pod."""
    try:
        with entered(netns), Rtnetlink() as rt:
            index = rt.link(TASK_INTERFACE).index
            # IPv6's chain too wherever the kernel has IPv6: `lo` may have lost it since.
            versions: tuple[Literal[4, 6], ...] = (4, 6) if IPV6_SYSCTLS.is_dir() else (4,)
            chains = tuple(t.family for t in find_present(versions) if t.remove())
            removed = tuple(a for a in task_addresses() if rt.delete_address(index, a))
            return Released(removed, chains)
    except NamespaceGone:
        return Released()


def check(
    netns: Path | None = None,
    *,
    uplink: str | None = None,
    imds_port: int = IMDS_PORT,
    container_port: int = CONTAINER_PORT,
) -> list[str]:
    """What is missing or wrong, one phrase each; empty when the namespace is ready."""
    problems = []
    with entered(netns), Rtnetlink() as rt:
        lo = rt.link(TASK_INTERFACE)
        addresses = task_addresses()
        rules = redirects(addresses, imds_port=imds_port, container_port=container_port)
        tables = find(_versions(addresses))
        if not lo.up:
            problems.append(f"{TASK_INTERFACE} is down")
        present = {a.interface: a.flags for a in rt.addresses(lo.index)}
        for address in addresses:
            flags = present.get(address)
            if flags is None:
                problems.append(f"{address} is not on {TASK_INTERFACE}")
            elif flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                problems.append(f"{address} on {TASK_INTERFACE} is not usable yet (DAD)")
        for family in tables:
            problems += family.problems(_of(family, rules))
        if uplink is not None:
            problems += _uplink_problems(rt, uplink)
    return problems


def _uplink_problems(rt: Rtnetlink, uplink: str) -> list[str]:
    rt.link(uplink)  # ENODEV, with the name, if there is no such interface
    conf = f"net/ipv4/conf/{uplink}"
    problems = []
    if read_sysctl(f"{conf}/accept_local") != "1":
        problems.append(f"accept_local is off on {uplink}: the node IMDS's replies are dropped")
    # Strict reverse-path filtering drops those replies even with accept_local: their source
    # routes to `lo`, not to the uplink. The kernel applies the larger of `all` and the link's.
    rp_filter = max(int(read_sysctl(f"net/ipv4/conf/{name}/rp_filter")) for name in ("all", uplink))
    if rp_filter == 1:
        problems.append(f"rp_filter is strict (1) on {uplink}: the node IMDS's replies are dropped")
    return problems


def default_route_interface(netns: Path | None = None) -> str | None:
    """The interface of the IPv4 default route (the pod's uplink), from /proc/net/route."""
    with entered(netns):
        # thread-self: the namespace this thread is in now, not the one the process started in.
        table = Path("/proc/thread-self/net/route").read_text().splitlines()[1:]
    for line in table:
        fields = line.split()
        # Iface Destination Gateway Flags RefCnt Use Metric Mask ...; RTF_UP is flag 0x1.
        if len(fields) >= 8 and fields[1] == fields[7] == "00000000" and int(fields[3], 16) & 1:
            return fields[0]
    return None
