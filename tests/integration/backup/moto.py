"""A real S3-compatible server for the archive tests: moto in server mode
(``moto_server``, the test extra ``moto[server]``) on a free port, started once per test
process and stopped at its exit."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from attrs import field, frozen

from tests.util import free_port, wait_for_port

REGION = "eu-west-1"
MIN_PART = 64 << 10  # this server's smallest part (S3's: 5 MiB, backup.archive_s3_part_mb)


@frozen
class Moto:
    endpoint: str
    access_key_id: str
    secret_key: str = field(repr=False)

    def boto(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_key)

    def create_bucket(self, bucket: str) -> None:
        self.boto().create_bucket(Bucket=bucket,
                                  CreateBucketConfiguration={"LocationConstraint": REGION})


_server: tuple[subprocess.Popen[bytes], Moto] | None = None


def moto_server() -> Moto:
    """A running moto server (started on first use) that checks every request's
    signature (IAM on: ``INITIAL_NO_AUTH_ACTION_COUNT`` lets only the three requests
    that make its user, key and policy through unsigned), with those credentials."""
    global _server
    if _server is not None and _server[0].poll() is None:
        return _server[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3",
                                 # parts of MIN_PART: multipart tests move little data
                                 "S3_UPLOAD_PART_MIN_SIZE": str(MIN_PART)},
                            start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)

    atexit.register(stop)
    wait_for_port("127.0.0.1", port, timeout=30)
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="unused", aws_secret_access_key="unused")
    iam.create_user(UserName="epio")
    made = iam.create_access_key(UserName="epio")["AccessKey"]
    iam.put_user_policy(UserName="epio", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    _server = (proc, Moto(endpoint, made["AccessKeyId"], made["SecretAccessKey"]))
    return _server[1]
