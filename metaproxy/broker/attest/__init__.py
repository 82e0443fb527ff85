"""AWS attestation: who signed a GetCallerIdentity, as an identity the policies can place.

`check` decides whether a signed call may be forwarded at all; `rules` maps the ARN STS
answers with to a tenant, app and task; `attestor` forwards and composes the two.
"""
