"""An S3 store that accepts connections but never answers fails a job in seconds, in one line naming it.

The store is a real TCP server on 127.0.0.1 that accepts every connection and never sends a byte:
what a hung MinIO or a black-holing proxy looks like to a client. pytest-timeout guards the time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from checkpoints import saved_checkpoint
from medray.config import build_config
from medray.data.datasets import ingest
from medray.io.storage import StoreUnreachable
from medray.runtime import start

S3_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "MEDRAY_S3_CONNECT_TIMEOUT", "MEDRAY_S3_READ_TIMEOUT", "MEDRAY_S3_ATTEMPTS")


@pytest.fixture
def silent_endpoint():
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    accepted: list[socket.socket] = []

    def accept_and_say_nothing():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # the server was shut down
                return

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join()
    for connection in accepted:
        connection.close()


@pytest.fixture
def dead_store(silent_endpoint, monkeypatch):
    """The job's S3 settings applied as ``medray <verb>`` applies them, restored afterwards."""
    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    def configured(**s3):
        raw = {"s3": {"endpoint_url": silent_endpoint, "region": "us-east-1", **s3},
               "ingest": {"format": "csv", "columns": {"labels": ["Mass"]}}}  # fmt: skip
        return start(build_config(raw), ray=False)

    return silent_endpoint, configured


def unreachable(endpoint: str, attempts: int, read: int) -> str:
    return (
        f"S3 endpoint {endpoint} did not connect or answer (s3.attempts {attempts}, s3.connect_timeout 5 s, s3.read_timeout {read} s): "
        "check that it is up and that s3.endpoint_url is right, or raise s3.read_timeout / s3.attempts"
    )


# The guard catches a hang (the old clients waited minutes); how fast it fails is measured, not asserted
# here: about 20 s with the defaults (2 attempts of a 5 s connect and 10 s read), on an idle machine.
@pytest.mark.timeout(120)
def test_ingest_from_a_store_that_never_answers_fails_within_the_default_timeouts_naming_the_endpoint(dead_store, tmp_path):
    endpoint, configured = dead_store
    config = configured()
    with pytest.raises(StoreUnreachable) as err:
        ingest("s3://medray-test/labels.csv", str(tmp_path / "manifest.parquet"), config.ingest)
    assert str(err.value) == unreachable(endpoint, attempts=2, read=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_listing_a_folder_on_a_dead_store_obeys_the_s3_section(dead_store, tmp_path):
    endpoint, configured = dead_store
    config = configured(read_timeout=1, attempts=1).ingest.model_copy(update={"format": "folder"})
    with pytest.raises(StoreUnreachable) as err:
        ingest("s3://medray-test/dicom-by-class/", str(tmp_path / "manifest.parquet"), config)
    assert str(err.value) == unreachable(endpoint, attempts=1, read=1)


# Most of this limit is a local Ray starting on a busy machine; the store's share is bounded by s3.*.
@pytest.mark.timeout(240)
def test_scoring_a_prefix_on_a_dead_store_fails_in_one_line_naming_the_endpoint(silent_endpoint, tmp_path):
    model = saved_checkpoint(tmp_path / "checkpoint", ["Effusion", "Mass"])
    env = {k: v for k, v in os.environ.items() if k not in S3_VARIABLES}
    env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    settings = [f"storage={tmp_path / 'runs'}", "score.input=s3://medray-test/archive/", f"score.checkpoint={model}",
                f"s3.endpoint_url={silent_endpoint}", "s3.read_timeout=1", "s3.attempts=1"]  # fmt: skip
    command = [sys.executable, "-m", "medray", "score", *(arg for s in settings for arg in ("--set", s))]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    # Ray may forward the listing worker's own log after this line; medray's verdict is this one line.
    verdicts = [line for line in result.stderr.splitlines() if line.startswith("medray score:")]
    assert verdicts == ["medray score: " + unreachable(silent_endpoint, attempts=1, read=1)]
