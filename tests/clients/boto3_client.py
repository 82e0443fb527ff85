"""boto3, default credential chain: STS GetCallerIdentity at argv[1]."""

from __future__ import annotations

import sys

import boto3
from report import run


def caller(endpoint: str) -> dict[str, object]:
    session = boto3.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise LookupError("boto3 found no credentials")
    identity = session.client("sts", endpoint_url=endpoint).get_caller_identity()
    return {
        "arn": identity["Arn"],
        "provider": credentials.method,
        "access_key": credentials.get_frozen_credentials().access_key,
    }


if __name__ == "__main__":
    run(boto3.__version__, lambda: caller(sys.argv[1]))
