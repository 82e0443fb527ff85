#!/bin/sh
# Writes the secret material an overlay's secretGenerator reads into OVERLAY/secrets/, under the
# names the keygen commands give their files, so nothing is renamed by hand:
#
#   broker-tls/   ca.pem ca.key broker.pem broker.key   metaproxy certs init (broker's Service)
#   webhook-tls/  ca.pem ca.key broker.pem broker.key   metaproxy certs init (webhook's Service)
#   audit-signing.key audit-signing.pub                 metaproxy audit keygen
#   document.key document.jwks.json                     metaproxy identity keygen --name document
#   store.key      one base64 AES-256 key a line (docs/fleet.md, "The store key")
#   control.token  the control API's bearer token, no trailing newline
#   store-password Valkey's --requirepass (hex: nothing to escape in a URL)
#   store-url      the brokers' METAPROXY_STORE: the in-cluster Valkey with that password
#
# Usage: deploy/kubernetes/make-secrets.sh deploy/kubernetes/overlays/eks
# METAPROXY names the metaproxy command if it is not on PATH (e.g. .venv/bin/metaproxy).
#
# Refuses to run if OVERLAY/secrets/ holds anything: replacing the CAs breaks every sidecar and
# the API server's trust in the webhook, and replacing the audit key orphans the signed log.
# Keep ca.key files offline once the Secrets are applied; nothing in the cluster needs them.
set -eu

if [ "$#" -ne 1 ] || [ ! -f "$1/kustomization.yaml" ]; then
	echo "usage: $0 OVERLAY_DIR (a directory with a kustomization.yaml)" >&2
	exit 2
fi
dir="$1/secrets"
metaproxy="${METAPROXY:-metaproxy}"
namespace=metaproxy

if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
	echo "$0: $dir is not empty; refusing to replace existing keys" >&2
	exit 1
fi
umask 077
mkdir -p "$dir"

"$metaproxy" certs init "$dir/broker-tls" \
	--hosts "metaproxy-broker.$namespace.svc,metaproxy-broker.$namespace.svc.cluster.local"
"$metaproxy" certs init "$dir/webhook-tls" \
	--hosts "metaproxy-webhook.$namespace.svc,metaproxy-webhook.$namespace.svc.cluster.local"
"$metaproxy" audit keygen --out "$dir"
"$metaproxy" identity keygen --out "$dir" --name document

random() { head -c 32 /dev/urandom; }
random | base64 >"$dir/store.key"
# The control token as `openssl rand -base64 32`, URL-safe: it travels in an HTTP header.
random | base64 | tr '+/' '-_' | tr -d '=\n' >"$dir/control.token"
password=$(random | od -An -tx1 | tr -d ' \n')
printf '%s' "$password" >"$dir/store-password"
printf '%s' "redis://:$password@metaproxy-valkey-0.metaproxy-valkey.$namespace.svc:6379/0" \
	>"$dir/store-url"
echo "wrote $dir"
