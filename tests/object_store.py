"""An S3-compatible object store on 127.0.0.1 for the tests: moto's server mode (``moto[server]``,
a dev dependency), reached through pyarrow's S3 filesystem like a real bucket.

The URIs carry everything a process needs (credentials, endpoint, region), so Ray workers and
Serve replicas reach the same server without any environment setup.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

BUCKET = "intentrec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def s3_server() -> Iterator[str]:
    """Start the server with one empty bucket; yields the bucket's base URI (``s3://...?...``)."""
    from moto.server import ThreadedMotoServer

    from graph.storage import filesystem

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Any key pair works with moto; pyarrow reads it from the URI's user info.
    base = (f"s3://test:test@{BUCKET}?endpoint_override=127.0.0.1:{port}&scheme=http"
            "&region=us-east-1")
    try:
        fs, _ = filesystem(base + "&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield base
    finally:
        server.stop()
