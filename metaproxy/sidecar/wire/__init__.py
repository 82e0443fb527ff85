"""The sidecar's own wire code, written by hand to keep every pod small (issue 13): an HTTP/1.1
server on httptools (`http1`), a one-connection HTTP client (`httpclient`) and the Prometheus
text exposition (`exposition`). No web framework, no prometheus-client; nothing here knows IMDS,
credentials or a broker."""
