"""Checks of the broker's settings whose grammar is richer than their type (regions, an EKS
cluster ARN, socket permissions, the attestation settings), on plain values: `broker/config.py`
runs them at start, and what starts a listener reads the socket's permissions from here."""

from __future__ import annotations

import grp
import re

from metaproxy.broker.attest.rules import parse_rule
from metaproxy.errors import ConfigError

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_CLUSTER_ARN = re.compile(r"^arn:aws[-a-z]*:eks:[a-z0-9-]+:\d{12}:cluster/[A-Za-z0-9][\w-]*$")


def check_sts_regions(
    regions: tuple[str, ...], region_endpoints: tuple[str, ...], sts_endpoint: str
) -> None:
    for region in regions:
        if not _REGION.match(region):
            raise ConfigError(f"--sts-regions: {region!r} is not a region name (e.g. us-west-2)")
        if regions.count(region) > 1:
            raise ConfigError(f"--sts-regions: {region} is listed twice")
    for entry in region_endpoints:
        region, sep, url = entry.partition("=")
        if not sep or not url.startswith(("https://", "http://")):
            raise ConfigError(f"--sts-region-endpoints: {entry!r} must be REGION=URL")
        if region not in regions:
            raise ConfigError(f"--sts-region-endpoints: {region!r} is not one of the STS regions")
    if len(regions) > 1 and sts_endpoint:
        raise ConfigError(
            "--sts-endpoint names one endpoint for several --sts-regions; "
            "give each region its own with --sts-region-endpoints"
        )


def check_cluster_arn(arn: str) -> None:
    if arn and not _CLUSTER_ARN.match(arn):
        raise ConfigError(
            f"--cluster-arn: {arn!r} is not an EKS cluster ARN "
            "(arn:aws:eks:REGION:ACCOUNT:cluster/NAME)"
        )


def socket_permissions(mode: str, group: str) -> tuple[int, int | None]:
    """--socket-mode and --socket-group as the mode bits and the gid (None: leave it)."""
    if not re.fullmatch(r"0?[0-7]{3}", mode):
        raise ConfigError(f"--socket-mode: {mode!r} is not octal 0000-0777")
    if not group:
        return int(mode, 8), None
    if group.isdigit():
        return int(mode, 8), int(group)
    try:
        return int(mode, 8), grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"--socket-group: no group named {group!r} on this machine") from None


def check_attestation(
    audience: str, rules: tuple[str, ...], max_age: float, sts_endpoint: str
) -> None:
    if not audience:
        if rules:
            raise ConfigError("--aws-attest-rules: needs --aws-attest-audience")
        return
    if len(audience) > 128 or not (audience.isascii() and audience.isprintable()):
        raise ConfigError("--aws-attest-audience: at most 128 printable ASCII characters")
    if not rules:
        raise ConfigError(
            "--aws-attest-audience: needs --aws-attest-rules (no role maps to a tenant)"
        )
    for spec in rules:
        parse_rule(spec)
    if not 1 <= max_age <= 900:
        raise ConfigError("--aws-attest-max-age: must be between 1 and 900 seconds")
    if sts_endpoint and not sts_endpoint.startswith(("https://", "http://")):
        raise ConfigError(f"--aws-attest-sts-endpoint: {sts_endpoint!r} is not an http(s) URL")
