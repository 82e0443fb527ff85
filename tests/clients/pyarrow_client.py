"""pyarrow's S3FileSystem (the AWS SDK for C++'s default chain): put an object in the bucket
argv[2] at the S3 endpoint argv[1], then list the bucket."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

import pyarrow
from pyarrow import fs
from report import run


def put_and_list(endpoint: str, bucket: str) -> dict[str, object]:
    url = urlsplit(endpoint)
    s3 = fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme)
    try:
        with s3.open_output_stream(f"{bucket}/matrix/pyarrow") as out:
            out.write(b"written by pyarrow")
        found = s3.get_file_info(fs.FileSelector(bucket, recursive=True))
        return {"listed": [info.path.removeprefix(bucket + "/") for info in found]}
    finally:
        del s3
        fs.finalize_s3()  # else the C++ SDK's threads outlive the interpreter and abort it


if __name__ == "__main__":
    run(pyarrow.__version__, lambda: put_and_list(sys.argv[1], sys.argv[2]))
