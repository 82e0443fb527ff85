"""minio with `IamAwsProvider` (its container-credentials and IMDS chain): put an object in the
bucket argv[2] at the S3 endpoint argv[1], then list the bucket."""

from __future__ import annotations

import io
import sys
from urllib.parse import urlsplit

import minio
from minio.credentials import IamAwsProvider
from report import run


def put_and_list(endpoint: str, bucket: str) -> dict[str, object]:
    url = urlsplit(endpoint)
    client = minio.Minio(
        url.netloc, secure=url.scheme == "https", credentials=IamAwsProvider(), region="us-east-1"
    )
    data = b"written by minio"
    client.put_object(bucket, "matrix/minio", io.BytesIO(data), len(data))
    return {"listed": [o.object_name for o in client.list_objects(bucket, recursive=True)]}


if __name__ == "__main__":
    run(minio.__version__, lambda: put_and_list(sys.argv[1], sys.argv[2]))
