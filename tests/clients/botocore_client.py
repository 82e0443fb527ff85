"""botocore alone, any generation, default credential chain: STS GetCallerIdentity at argv[1]."""

from __future__ import annotations

import sys
from typing import Any

import botocore
import botocore.session
from report import run


def caller(endpoint: str) -> dict[str, object]:
    session = botocore.session.get_session()
    credentials = session.get_credentials()
    if credentials is None:
        raise LookupError("botocore found no credentials")
    sts: Any = session.create_client("sts", endpoint_url=endpoint)  # any generation: no stubs
    identity = sts.get_caller_identity()
    return {
        "arn": identity["Arn"],
        "provider": credentials.method,
        "access_key": credentials.get_frozen_credentials().access_key,
    }


if __name__ == "__main__":
    run(botocore.__version__, lambda: caller(sys.argv[1]))
