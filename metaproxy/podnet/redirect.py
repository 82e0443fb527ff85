"""The namespace's NAT redirect from the metadata addresses to the sidecar's loopback ports.

The sidecar listens on 127.0.0.1 and ::1 only. A sidecar socket on `169.254.169.254:80` would
make every wildcard bind of port 80 in the pod (`listen 80;` in nginx) fail with EADDRINUSE,
SO_REUSEADDR or not. So the namespace's nat table sends the metadata addresses' port 80 to the
sidecar's ports instead, in a chain of ours:

    -I OUTPUT 1 -o lo -j METAPROXY-LINK-LOCAL
    -A METAPROXY-LINK-LOCAL -d 169.254.169.254/32 -p tcp --dport 80 -j REDIRECT --to-ports 8182
    …

REDIRECT in OUTPUT rewrites the destination to 127.0.0.1 (::1 for IPv6). Only packets routed to
`lo` jump: the sidecar reaches the node's IMDS with a socket bound to the uplink
(SO_BINDTODEVICE), which leaves through the uplink and must not come back to the sidecar. The
jump is inserted first, so a catch-all redirect to a mesh's proxy already in OUTPUT does not take
the metadata addresses first.

Rules are programmed the way kube-proxy, CNI's portmap and istio-init do it: by running the
`iptables` binaries, as children of this thread, which `entered(netns)` has moved into the
namespace (a child inherits its parent thread's network namespace). iptables-nft needs
CAP_NET_ADMIN only; iptables-legacy also needs CAP_NET_RAW and a writable /run/xtables.lock.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from metaproxy.podnet.netlink import IPInterface

CHAIN = "METAPROXY-LINK-LOCAL"
JUMP = ("-o", "lo", "-j", CHAIN)
PACKAGE = "iptables"
# A container runtime may hand its children a PATH without the sbin directories.
EXTRA_DIRS = ("/usr/sbin", "/sbin")
# -w: wait up to 5 s for iptables-legacy's host-wide lock, which kube-proxy and other agents
# take on a busy node, rather than fail at once; iptables-nft accepts and ignores it.
WAIT = ("-w", "5")
TIMEOUT_SECONDS = 30.0


class IptablesError(OSError):
    """An iptables binary is missing or refused; `str()` is one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, slots=True)
class Redirect:
    """TCP to `address` port `port` goes to the sidecar's `to_port` on loopback."""

    address: IPInterface
    port: int
    to_port: int

    def rule(self) -> tuple[str, ...]:
        return (
            *("-d", str(self.address), "-p", "tcp", "--dport", str(self.port)),
            *("-j", "REDIRECT", "--to-ports", str(self.to_port)),
        )

    def __str__(self) -> str:
        host = f"[{self.address.ip}]" if self.address.version == 6 else str(self.address.ip)
        return f"{host}:{self.port} -> :{self.to_port}"


def _find(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *EXTRA_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        raise IptablesError(
            errno.ENOENT,
            f"{name} not found in PATH, {' or '.join(EXTRA_DIRS)}: install the {PACKAGE} "
            "package (the link-local redirect needs it)",
        )
    return os.path.abspath(path)


@dataclass(frozen=True, slots=True)
class Iptables:
    """One address family's binaries, by absolute path, resolved before anything changes."""

    version: Literal[4, 6]
    command: str
    restore: str

    @classmethod
    def find(cls, version: Literal[4, 6]) -> Iptables:
        prefix = "iptables" if version == 4 else "ip6tables"
        return cls(version, _find(prefix), _find(f"{prefix}-restore"))

    @property
    def family(self) -> str:
        return f"IPv{self.version}"

    def _run(self, argv: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        name = os.path.basename(argv[0])
        try:
            return subprocess.run(  # noqa: S603 - our binaries by absolute path, fixed arguments
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            message = f"{name}: no answer after {TIMEOUT_SECONDS:g}s"
            raise IptablesError(errno.ETIMEDOUT, message) from None
        except OSError as exc:
            raise IptablesError(exc.errno or errno.EIO, f"{name}: {exc.strerror}") from None

    def _checked(self, argv: Sequence[str], stdin: str = "") -> str:
        done = self._run(argv, stdin)
        if done.returncode != 0:
            raise _refused(argv[0], done)
        return done.stdout

    def _nat(self, *args: str) -> list[str]:
        return [self.command, *WAIT, "-t", "nat", *args]

    def state(self) -> tuple[bool, int]:
        """Whether our chain exists, and how many OUTPUT rules jump to it from `lo`. Read from
        the listing, not with `-C`: iptables-nft answers `-C` for a jump to a missing chain with
        a usage error, not "no such rule"."""
        lines = [line.split() for line in self._checked(self._nat("-S")).splitlines()]
        return ["-N", CHAIN] in lines, lines.count(["-A", "OUTPUT", *JUMP])

    def apply(self, redirects: Sequence[Redirect]) -> None:
        """Our chain holding exactly `redirects`, and one jump to it, in one transaction.

        With --noflush, declaring a chain creates it or empties it, and nothing else in the
        table changes; the jump is added only where the listing shows none, so a repeat leaves
        one. (Two runs racing in one namespace could add two jumps: harmless, as the chain ends
        in REDIRECT or falls through, and `remove` deletes every copy. The runtime and the init
        container never race.)"""
        _, jumps = self.state()
        lines = ["*nat", f":{CHAIN} - [0:0]"]
        lines += [" ".join(("-A", CHAIN, *r.rule())) for r in redirects]
        if jumps == 0:
            lines.append(" ".join(("-I", "OUTPUT", "1", *JUMP)))
        lines.append("COMMIT")
        self._checked([self.restore, *WAIT, "--noflush"], "\n".join(lines) + "\n")

    def remove(self) -> bool:
        """Every jump, then the chain, in one transaction; False when there was no chain (then
        there can be no jump to it, and the table is left untouched)."""
        exists, jumps = self.state()
        if not exists:
            return False
        lines = ["*nat", f":{CHAIN} - [0:0]"]
        lines += [" ".join(("-D", "OUTPUT", *JUMP))] * jumps
        lines += [f"-X {CHAIN}", "COMMIT"]
        self._checked([self.restore, *WAIT, "--noflush"], "\n".join(lines) + "\n")
        return True

    def problems(self, redirects: Sequence[Redirect]) -> list[str]:
        """What is missing, one phrase each."""
        exists, jumps = self.state()
        if not exists:
            return [f"no {self.family} nat chain {CHAIN}: nothing redirects the addresses"]
        problems = []
        if jumps == 0:
            problems.append(f"{self.family} nat OUTPUT does not jump to {CHAIN} for lo")
        for redirect in redirects:
            argv = self._nat("-C", CHAIN, *redirect.rule())
            done = self._run(argv)
            if done.returncode == 1:
                problems.append(f"no redirect {redirect}")
            elif done.returncode != 0:
                raise _refused(argv[0], done)
        return problems


def _refused(binary: str, done: subprocess.CompletedProcess[str]) -> IptablesError:
    """The first line of iptables' stderr (the rest are usage hints), naming the binary."""
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    reason = lines[0] if lines else f"exit status {done.returncode}"
    name = os.path.basename(binary)
    # "Permission denied (you must be root)": without CAP_NET_ADMIN (or legacy's CAP_NET_RAW).
    code = errno.EPERM if "Permission denied" in done.stderr else errno.EIO
    return IptablesError(code, reason if reason.startswith(name) else f"{name}: {reason}")


def find(versions: Sequence[Literal[4, 6]]) -> tuple[Iptables, ...]:
    """The binaries for each family, or the first one missing as an error naming the package."""
    return tuple(Iptables.find(version) for version in versions)


def find_present(versions: Sequence[Literal[4, 6]]) -> tuple[Iptables, ...]:
    """Those families whose binaries are installed: without them nothing could have added rules
    to remove."""
    present = []
    for version in versions:
        try:
            present.append(Iptables.find(version))
        except IptablesError:
            continue
    return tuple(present)
