"""Tenant policies: load and validate (`load`), decide (`evaluate`), build STS parameters
(`sts_params`), keep the last good set in force (`store`), and `metaproxy policy` (`cli`)."""
