"""Commands that stand on their own rather than serving: `metaproxy revoke`, `metaproxy certs`,
and the configuration page generator. Each is an operator's tool over the parts below."""
