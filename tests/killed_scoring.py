"""A scoring job killed part-way: the setting of the exactly-once tests (folders, S3, DICOMweb alike)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medray.scoring.score import COMMITTED

REPO = Path(__file__).resolve().parents[1]


def kill_after_two_parts(ray_session, output: Path, overrides: list[str], log: Path) -> dict[str, int]:
    """Runs `medray score` as a second driver on the session's Ray (RAY_ADDRESS), SIGKILLs it once two parts
    are committed, and returns the committed markers then (name → mtime), for the rerun to leave untouched."""
    command = [sys.executable, "-m", "medray.cli", "score", *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": f"{REPO / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    committed = output / COMMITTED
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 180  # a hang guard: the event waited for is two committed parts
        while not (committed.exists() and len(list(committed.glob("*.json"))) >= 2):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the scoring job committed no part in time"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return {p.name: p.stat().st_mtime_ns for p in committed.glob("*.json")}
