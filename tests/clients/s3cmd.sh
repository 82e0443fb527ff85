#!/bin/sh
# s3cmd, unconfigured (no ~/.s3cfg): it asks IMDS at 169.254.169.254 itself. Puts an object in the
# bucket $2 at the S3 endpoint $1 and lists the bucket. Prints one JSON line: the version and the
# keys listed, or the error; exits 0 or 1.
set -u
host=${1#*://}
bucket=$2
scheme=${1%%://*}
escape() { printf '%s' "$1" | tr '\n\t' '  ' | sed 's/\\/\\\\/g; s/"/\\"/g' | cut -c1-400; }
version=$(s3cmd --version | sed -n 's/^s3cmd version //p')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
set -- --host="$host" --host-bucket="$host"
[ "$scheme" = https ] || set -- "$@" --no-ssl
echo "written by s3cmd" >"$work/object"
if s3cmd "$@" put "$work/object" "s3://$bucket/matrix/s3cmd" >"$work/out" 2>&1 &&
	s3cmd "$@" ls --recursive "s3://$bucket" >"$work/out" 2>&1; then
	listed=$(awk '{ sub("^s3://[^/]*/", "", $4); printf "%s\"%s\"", (NR > 1 ? ", " : ""), $4 }' \
		"$work/out")
	printf '{"version": "%s", "listed": [%s]}\n' "$version" "$listed"
else
	printf '{"version": "%s", "error": "%s"}\n' "$version" "$(escape "$(tail -n 3 "$work/out")")"
	exit 1
fi
