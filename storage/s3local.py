"""A local S3-protocol server (moto's standalone server) on 127.0.0.1, for tests and the ledger
benchmark: the service's object-storage paths run against a real HTTP S3 API, with no account.

    with local_s3() as endpoint:            # sets AWS_ENDPOINT_URL and test credentials
        Ledger("s3://bucket/studies/x")...

Needs `moto[server]` (a dev dependency); the server is a subprocess ended by its PID on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Iterator

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """(process, endpoint URL) of a fresh moto server on a free port of 127.0.0.1."""
    port = _free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    command = [exe] if exe else [sys.executable, "-m", "moto.server"]
    process = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}; is moto[server] installed?")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout:.0f}s")
            time.sleep(0.05)
    return process, f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str, bucket: str) -> None:
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True, access_key=AWS_ENV["AWS_ACCESS_KEY_ID"],
                      secret_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], region=AWS_ENV["AWS_DEFAULT_REGION"]).create_dir(bucket)


@contextlib.contextmanager
def local_s3(bucket: str = "bkt") -> Iterator[str]:
    """A running server with `bucket`, AWS_ENDPOINT_URL and test credentials in os.environ (restored after)."""
    process, endpoint = start()
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        make_bucket(endpoint, bucket)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
