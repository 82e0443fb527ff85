"""Tamper-evident audit log: hash-chained JSON-lines segments, signed checkpoints, S3 shipping.

The broker calls `record.make_record` and `writer.AuditLog`; the security team uses
`metaproxy audit verify|query|tail`. Nothing here is imported by the sidecar.
"""
