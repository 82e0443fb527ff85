"""DNS rebinding: a web page in a browser inside the task must not read the task's credentials.

A page from `evil.example` can have its name re-pointed to 169.254.169.254 (or the loopback
address of the container endpoint) after it loaded, and then its own scripts talk to the sidecar
as "same origin". Two things give such a request away, and no SDK or tool sends either:

- its `Host` is the attacker's name. Every real client (botocore, the AWS CLI, the SDKs for
  JavaScript, Go, Ruby, curl, cloud-init) addresses the sidecar by IP literal, or by `localhost`
  for the container endpoint; operators who point SDKs at a name list it in `--allowed-hosts`.
- the browser adds `Origin` (to any non-GET, and to cross-origin GETs) and `Sec-Fetch-*`.

A request without `Host` (HTTP/1.0) is not from a browser: browsers always send one.
"""

from __future__ import annotations

import ipaddress

BROWSER_HEADER_PREFIX = "sec-fetch-"


MAX_CACHED_HOSTS = 256


class HostCheck:
    """One sidecar's `--allowed-hosts`, and the Host values already judged: a client sends the
    same Host on every request. Bounded: a client cycling through names only resets it."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = tuple(h.strip().lower().removesuffix(".") for h in allowed)
        self._seen: dict[str, bool] = {}
        # The last headers judged, and the verdict: a repeated request comes with the very same
        # headers object (`http1`'s repeats), and is judged as it was.
        self._last: tuple[dict[str, str], bool] | None = None

    def refuses(self, headers: dict[str, str]) -> bool:
        """True when the request must be refused: a browser's markers, or a Host not ours."""
        last = self._last
        if last is not None and last[0] is headers:
            return last[1]
        refused = self._judge(headers)
        self._last = (headers, refused)
        return refused

    def _judge(self, headers: dict[str, str]) -> bool:
        if has_browser_markers(headers):
            return True
        host = headers.get("host")
        if host is None:
            return False
        allowed = self._seen.get(host)
        if allowed is None:
            if len(self._seen) >= MAX_CACHED_HOSTS:
                self._seen.clear()
            allowed = self._seen[host] = host_allowed(host, self.allowed)
        return not allowed


def has_browser_markers(headers: dict[str, str]) -> bool:
    if "origin" in headers:
        return True
    return any(name.startswith(BROWSER_HEADER_PREFIX) for name in headers)


def from_browser_or_foreign_host(headers: dict[str, str], allowed: tuple[str, ...]) -> bool:
    """True when the request must be refused: a browser's markers, or a Host not ours."""
    if has_browser_markers(headers):
        return True
    host = headers.get("host")
    return host is not None and not host_allowed(host, allowed)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """`169.254.169.254`, `127.0.0.1:8080`, `[fd00:ec2::254]`, `localhost`, or an allow-listed
    name (any port; `allowed` lower-case, without a trailing dot)."""
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6] or [IPv6]:port
        literal, bracket, _port = name[1:].partition("]")
        return bool(bracket) and _is_ip(literal)
    if name.count(":") == 1:
        name, _, port = name.partition(":")
        if not port.isdigit():
            return False
    name = name.removesuffix(".")
    return _is_ip(name) or name == "localhost" or name in allowed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
