"""metaproxy: a secure multi-tenant metadata and credential proxy for container platforms."""

__version__ = "0.1.0"
