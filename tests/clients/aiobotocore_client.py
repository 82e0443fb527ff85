"""aiobotocore, default credential chain (its own async providers): STS GetCallerIdentity at
argv[1]."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version

from aiobotocore.session import get_session
from report import run


async def caller(endpoint: str) -> dict[str, object]:
    session = get_session()
    credentials = await session.get_credentials()
    if credentials is None:
        raise LookupError("aiobotocore found no credentials")
    frozen = await credentials.get_frozen_credentials()
    async with session.create_client("sts", endpoint_url=endpoint) as sts:
        identity = await sts.get_caller_identity()
    return {"arn": identity["Arn"], "provider": credentials.method, "access_key": frozen.access_key}


if __name__ == "__main__":
    run(version("aiobotocore"), lambda: asyncio.run(caller(sys.argv[1])))
