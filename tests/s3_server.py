"""A local S3-compatible server (moto's server mode) on the loopback for the object-storage tests: started and
stopped by the test that needs it, credentials and endpoint handed over as environment variables (as a user sets
them for a real bucket)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A running server; yields the environment that points pyarrow (and boto3) at it, with one fresh bucket
    named in ``CAPSAFE_TEST_BUCKET``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}", "CAPSAFE_TEST_BUCKET": f"capsafe-{uuid.uuid4().hex[:10]}"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=env["CAPSAFE_TEST_BUCKET"])
        yield env
    finally:
        server.stop()


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process for the block (pyarrow reads the endpoint when a file system is made)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
