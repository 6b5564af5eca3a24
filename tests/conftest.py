"""Shared test fixtures.

S3: ``s3_endpoint`` runs one moto S3 server over real HTTP for the whole session (boto3
talks to it exactly as to MinIO/AWS); ``s3_bucket`` gives each test a fresh bucket URL.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import torch

# Variables that could point boto3 elsewhere or at real credentials during tests.
_AWS_ENV_CLEARED = (
    "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
)


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process here, with pytest's exit status, skipping the interpreter's teardown.
    After every test had passed and pytest had printed its summary, that teardown crashed the
    process with SIGSEGV in 2 of 6 clean-clone CI runs on 2 cores (2026-12-06): a native thread,
    not the main one, jumped into heap memory (kernel log: "segfault at <heap> ip <same> ... error
    15"), as threads of a library whose objects its exit handlers destroy under it do (Ray's C++
    exit handler runs in every process that called ray.init; it also deadlocked a Ray worker here).
    Everything a test owns is stopped by its fixtures before this hook; what is skipped is the
    interpreter's own finalization and atexit (whose stop_ray finds nothing left to stop)."""
    import os
    import sys

    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:  # no session ran (e.g. --help): the usual exit
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Test models are far too small to gain from intra-op threads; on a shared 2-core machine
    the second thread's spin-waiting made them up to 20x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a local S3 endpoint; AWS_* env points boto3 at it until the session ends."""
    from moto.server import ThreadedMotoServer

    # Port 0: the OS picks a free port at bind time, so parallel sessions never collide.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>/prefix`` on the session's endpoint (the bucket exists, empty)."""
    import boto3

    bucket = f"genmodels-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
