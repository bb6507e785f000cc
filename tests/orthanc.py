"""A real PACS on 127.0.0.1: Debian's Orthanc with its DICOMweb plugin, on free ports with a temporary store.

Tests that need it use the `orthanc` fixture (conftest.py); it skips, naming the packages, where they are missing
(`.ci/run` installs them)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medray", "pacs-test-password"


def authorization() -> str:
    """The Authorization header's value every test PACS expects: the same for each, so that it can be exported
    before Ray starts (Ray's workers list and fetch instances, and inherit the environment of that moment)."""
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def available() -> bool:
    return shutil.which("Orthanc") is not None and PLUGIN.exists()


@dataclass(frozen=True)
class Pacs:
    url: str  # the REST root, e.g. http://127.0.0.1:8042
    authorization: str  # the value of the Authorization header Orthanc expects

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def uri(self) -> str:
        """The same server as medray names a DICOMweb source."""
        return "dicomweb://" + self.dicomweb.removeprefix("http://")

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = {"Authorization": self.authorization}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as response:
            data = response.read()
        return json.loads(data) if data and data[:1] in (b"{", b"[") else data

    def upload(self, path: Path) -> dict:
        """Stores one DICOM file through Orthanc's REST API (not through medray)."""
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")

    def instances(self) -> list[str]:
        return self.request("GET", "/instances")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def orthanc_server(folder: Path):
    """Starts Orthanc with its store in `folder`, waits until its REST API answers, stops it afterwards."""
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "medray-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}", "Ssl": False},
        "StableAge": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    pacs = Pacs(f"http://127.0.0.1:{http_port}", authorization())
    try:
        # Readiness is an event (the REST API answers), polled; the deadline only bounds a broken install.
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {process.returncode}: {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                pacs.request("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not answer within 120 s") from None
                time.sleep(0.2)
        yield pacs
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def environment(pacs: Pacs, variable: str = "MEDRAY_DICOMWEB_AUTHORIZATION") -> dict[str, str]:
    """What a user exports so that medray sends the PACS's credentials (never written in a config file)."""
    return {**os.environ, variable: pacs.authorization}
