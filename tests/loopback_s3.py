"""A real S3-compatible server (moto) on 127.0.0.1 for the tests of stores and weights on ``s3://``.

Configured only through the standard AWS environment, exactly what a user sets for an S3-compatible
endpoint; the AWS config files are pointed away so nothing from this machine's ``~/.aws`` leaks in,
and nothing but loopback is contacted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def loopback_s3(bucket: str, scratch: Path) -> Iterator[object]:
    """Start moto on a free loopback port with an empty ``bucket``; yield an ``s3fs.S3FileSystem``.

    ``scratch`` is a directory for the (absent) AWS config files. moto keeps buckets in the process,
    not in the server, so the bucket is removed again on exit for the next module that starts one.
    """
    import s3fs
    from moto import server as moto_server

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = scratch / "absent"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),
                            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
                            "no_proxy": "127.0.0.1"}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            patch.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        try:
            yield fs
        finally:
            fs.rm(bucket, recursive=True)
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
