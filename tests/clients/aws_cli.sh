#!/bin/sh
# The AWS CLI given as $1 (v1 from pip, or Debian's v2), unconfigured: `aws sts
# get-caller-identity` at the endpoint $2. Prints one JSON line: the CLI's version and the ARN it
# was given, or the error; exits 0 or 1.
set -u
aws=$1
endpoint=$2
escape() { printf '%s' "$1" | tr '\n\t' '  ' | sed 's/\\/\\\\/g; s/"/\\"/g' | cut -c1-400; }
version=$("$aws" --version 2>&1 | sed -n 's|^aws-cli/\([^ ]*\).*|\1|p')
if arn=$("$aws" sts get-caller-identity --endpoint-url "$endpoint" --query Arn --output text \
		2>/tmp/aws-cli.$$.err); then
	rm -f /tmp/aws-cli.$$.err
	printf '{"version": "%s", "arn": "%s"}\n' "$version" "$(escape "$arn")"
else
	error=$(tail -n 3 /tmp/aws-cli.$$.err)
	rm -f /tmp/aws-cli.$$.err
	printf '{"version": "%s", "error": "%s"}\n' "$version" "$(escape "$error")"
	exit 1
fi
