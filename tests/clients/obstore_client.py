"""obstore (Rust object_store), credentials from its own environment chain: put an object in the
bucket argv[2] at the S3 endpoint argv[1], then list the bucket."""

from __future__ import annotations

import sys

import obstore
from obstore.store import S3Store
from report import run


def put_and_list(endpoint: str, bucket: str) -> dict[str, object]:
    store = S3Store(bucket, endpoint=endpoint, client_options={"allow_http": True})
    obstore.put(store, "matrix/obstore", b"written by obstore")
    listed = [meta["path"] for chunk in obstore.list(store) for meta in chunk]
    return {"listed": listed}


if __name__ == "__main__":
    run(obstore.__version__, lambda: put_and_list(sys.argv[1], sys.argv[2]))
