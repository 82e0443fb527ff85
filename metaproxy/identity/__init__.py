"""Task identity: signing keys and JWKS (`keys`), token issuance (`issue`) and verification
(`verify`), signed instance-identity documents (`document`) and the `metaproxy identity` commands.

Nothing is imported here: `metaproxy.cli` imports `metaproxy.identity.cli` for every command,
including the sidecar, which must start without loading pyjwt and cryptography it may not need.
"""
