"""Connections and HTTP framing shared by every server: the connection guard (caps, eviction, the
descriptor budget, first-request deadlines), the guarded listener, its aiohttp site, request
framing checks, and the JSON error answers. Nothing here knows a broker, a sidecar or a tenant."""
