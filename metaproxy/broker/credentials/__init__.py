"""The credential path: one interface (`source.CredentialSource`), one stack of layers.

From the top: this replica's cache (`local`), a revocation check (`guard`), the fleet's shared
cache (`fleet`, only with a shared store), another revocation check, the scheduler (`scheduler`:
fair queue, autoscaled workers) and the STS caller under it (`caller`: budget, retries,
regions, circuits), and STS itself (`sts`, `sigv4`). `broker/server.py` composes it once.
"""
