"""The shapes of the names a policy file holds: tenants, namespaces, role ARNs."""

from __future__ import annotations

import re

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1123 label
# arn:PARTITION:iam::ACCOUNT:role/PATH/NAME; path segments are printable ASCII except `/`.
ROLE_ARN = re.compile(
    r"^arn:aws[-a-z]*:iam::\d{12}:role/(?:[!-.0-~]{1,512}/)*[\w+=,.@-]{1,64}$", re.ASCII
)
