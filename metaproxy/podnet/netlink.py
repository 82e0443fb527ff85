"""A minimal rtnetlink client: links, addresses and one IPv4 devconf value, with `struct`.

Just what `addresses` needs, over a `NETLINK_ROUTE` socket that acts in the network namespace
the calling thread was in when the socket was opened. Every change is acknowledged; a refusal
becomes a `NetlinkError` carrying the errno and one line naming the request (with the kernel's
extended-ack text when it sends one, e.g. "ipv4: Address not found").

Message layouts are those of <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h> and
<linux/if_addr.h>; all integers are in host byte order.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Self

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# struct nlmsghdr, ifinfomsg, ifaddrmsg, rtattr
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR answer
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1
IFLA_IFNAME, IFLA_AF_SPEC = 3, 26
IFLA_INET_CONF = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFF_UP = 0x1
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x02, 0x08, 0x40
IPV4_DEVCONF_ACCEPT_LOCAL = 23  # enum in <linux/ip.h>: accept packets with a local source

# What a delete of an absent address answers: IPv4 and IPv6 say EADDRNOTAVAIL; ENOENT and ESRCH
# are what older kernels and other object types use for "no such entry".
NOT_THERE = frozenset({errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH})
RECEIVE_BYTES = 65536  # a dump part is at most a few pages
TIMEOUT_SECONDS = 5.0


class NetlinkError(OSError):
    """The kernel refused a request; `errno` says why, `str()` is one line naming the request."""

    def __init__(self, code: int, request: str, detail: str = "") -> None:
        reason = os.strerror(code) + (f" ({detail})" if detail else "")
        super().__init__(code, f"{request}: {reason}")

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    up: bool


@dataclass(frozen=True, slots=True)
class Address:
    interface: IPInterface
    flags: int  # IFA_F_*


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """Top-level attributes of a message body, by type (the nested flag bit masked off)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        found[kind & 0x3FFF] = data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _family(address: IPInterface) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


class Rtnetlink:
    """`with Rtnetlink() as rt: rt.replace_address(rt.link("lo").index, ...)`."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.settimeout(TIMEOUT_SECONDS)
            self._sock.bind((0, 0))
            for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                # Older kernels lack these: plain errno answers, which are enough.
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(SOL_NETLINK, option, 1)
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def link(self, name: str) -> Link:
        """The interface called `name`: its index and whether it is up (ENODEV if absent)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        (answer,) = self._request(RTM_GETLINK, 0, body, f"RTM_GETLINK {name}")
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(answer)
        return Link(index, bool(flags & IFF_UP))

    def set_link_up(self, index: int) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self._request(RTM_NEWLINK, 0, body, f"RTM_NEWLINK up #{index}")

    def replace_address(self, index: int, address: IPInterface, flags: int = 0) -> None:
        """Add `address`, or update it if it is there already (`ip addr replace`)."""
        body = self._ifaddrmsg(index, address, flags)
        body += _attr(IFA_FLAGS, _U32.pack(flags))
        what = f"RTM_NEWADDR {address} on #{index}"
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body, what)

    def delete_address(self, index: int, address: IPInterface) -> bool:
        """Remove `address`; False (not an error) when it was not there."""
        try:
            body = self._ifaddrmsg(index, address, 0)
            self._request(RTM_DELADDR, 0, body, f"RTM_DELADDR {address} on #{index}")
        except NetlinkError as exc:
            if exc.errno in NOT_THERE:
                return False
            raise
        return True

    def addresses(self, index: int) -> list[Address]:
        """Every IPv4 and IPv6 address on the interface."""
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        found = []
        for answer in self._request(RTM_GETADDR, NLM_F_DUMP, body, "RTM_GETADDR"):
            family, prefix, flags, _scope, ifindex = _IFADDRMSG.unpack_from(answer)
            attrs = _attrs(answer[_IFADDRMSG.size :])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if ifindex != index or raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if IFA_FLAGS in attrs:
                (flags,) = _U32.unpack(attrs[IFA_FLAGS][: _U32.size])
            ip = ipaddress.ip_address(raw)
            found.append(Address(ipaddress.ip_interface(f"{ip}/{prefix}"), flags))
        return found

    def set_ipv4_devconf(self, index: int, item: int, value: int) -> None:
        """One `net.ipv4.conf.<interface>.*` value, through the link (so a read-only /proc/sys,
        as in containers, does not matter): IFLA_AF_SPEC → AF_INET → IFLA_INET_CONF → item."""
        conf = _attr(IFLA_INET_CONF, _attr(item, _U32.pack(value)))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        body += _attr(IFLA_AF_SPEC, _attr(socket.AF_INET, conf))
        self._request(RTM_NEWLINK, 0, body, f"RTM_NEWLINK ipv4 devconf {item}={value} #{index}")

    @staticmethod
    def _ifaddrmsg(index: int, address: IPInterface, flags: int) -> bytes:
        raw = address.ip.packed
        header = _IFADDRMSG.pack(
            _family(address), address.network.prefixlen, flags & 0xFF, 0, index
        )
        return header + _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)

    def _request(self, kind: int, flags: int, body: bytes, what: str) -> list[bytes]:
        """Send one request and collect its answers: the dump's parts up to NLMSG_DONE, or the
        replies up to the acknowledgement."""
        self._seq += 1
        seq = self._seq
        flags |= NLM_F_REQUEST | (0 if flags & NLM_F_DUMP == NLM_F_DUMP else NLM_F_ACK)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)
        answers: list[bytes] = []
        while True:
            data = self._sock.recv(RECEIVE_BYTES)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, msg_flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    raise NetlinkError(errno.EBADMSG, what, "truncated answer")
                payload = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue  # a late answer to an earlier request
                if msg_type == NLMSG_ERROR:
                    (code,) = _I32.unpack_from(payload)
                    if code:
                        raise NetlinkError(-code, what, _extack(payload, msg_flags))
                    return answers
                if msg_type == NLMSG_DONE:
                    code = _I32.unpack_from(payload)[0] if len(payload) >= _I32.size else 0
                    if code:
                        raise NetlinkError(-code, what)
                    return answers
                answers.append(payload)


def _extack(payload: bytes, flags: int) -> str:
    """The kernel's one-line reason, from the TLVs after the echoed request header."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    (inner_length,) = _U32.unpack_from(payload, _I32.size)
    start = _I32.size + (_NLMSGHDR.size if flags & NLM_F_CAPPED else inner_length)
    message = _attrs(payload[start:]).get(NLMSGERR_ATTR_MSG, b"")
    return message.rstrip(b"\0").decode(errors="replace")
