"""`ray job submit` against a real local cluster that the test starts (`ray start --head`) and stops."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def venv_env() -> dict:
    """As in an activated virtual environment: the job's `python` is the one with medray's dependencies.
    Read when called, after Ray has set up its auth settings in this process's environment."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def free_ports(count: int) -> list[int]:
    """Distinct ports, free now, that nothing else takes before the head binds them: below the kernel's
    ephemeral range (where bind(0) and outgoing connections, Ray's own included, get theirs) and above Ray's
    worker ports (10002-19999). A port given back by bind(0) could be handed to the next process at once."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.Random().sample(range(20_000, ephemeral_low), k=200)  # parallel sessions pick apart
    with contextlib.ExitStack() as held:  # held until all are chosen, so no two are the same
        ports = []
        for port in candidates:
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports below the ephemeral range")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_session):
    """A second, separate Ray: the session's own local Ray is started first, so it never joins this one.
    One head for the module's jobs."""
    tmp_path = tmp_path_factory.mktemp("head")
    # Ports of its own, so that its agents do not collide with the session's Ray on the same machine.
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")  # fmt: skip
    dashboard, gcs, *agents = free_ports(2 + len(names))
    gcs_port = str(gcs)
    ports = [f"--port={gcs_port}"] + [f"--{name}={port}" for name, port in zip(names, agents)]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", *ports, "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],  # fmt: skip
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=venv_env(),
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering, if only to ask for Ray's auth token: it is up
            break
        except OSError:
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                pytest.fail("the Ray head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:])
            time.sleep(1)
    yield address, head, tmp_path / "head.log"
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the cluster it started
    head.wait(timeout=60)
    current = Path("/tmp/ray/ray_current_cluster")  # as `ray stop` would: forget the stopped cluster
    if current.exists() and current.read_text().strip().endswith(gcs_port):
        current.unlink()


def submit(address: str, job: str, overrides: list[str]) -> subprocess.CompletedProcess:
    command = [RAY, "job", "submit", "--address", address, "--runtime-env", "jobs/runtime_env.yaml", "--",
               "python", job, "--config", "jobs/configs/demo.yaml"]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    for _ in range(20):  # the head's job agent comes up a few seconds after its dashboard
        done = subprocess.run(command, cwd=REPO, env=venv_env(), capture_output=True, text=True, timeout=600, check=False)
        if "No available agent" not in done.stderr:
            return done
        time.sleep(3)
    return done


def test_train_job_runs_through_ray_job_submit(cluster, split_manifest_path, tmp_path):
    address, head, log = cluster
    storage = tmp_path / "runs"
    overrides = [
        "name=submitted", f"storage={storage}", f"data.manifest={split_manifest_path}", "data.image_size=32",
        "train.epochs=1", "train.workers=1", "train.cpus_per_worker=0.5", "train.batch_size=16",
    ]  # fmt: skip
    done = submit(address, "jobs/train.py", overrides)
    assert head.poll() is None, "the Ray head stopped:\n" + log.read_text()[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    # The epoch's line reaches the job's log once, from the driver; the workers' own output stays in their log files.
    assert done.stdout.count("epoch 1/1: loss") == 1 and "(RayTrainWorker pid=" not in done.stdout, done.stdout[-3000:]
    best = json.loads((storage / "submitted" / "best_checkpoint.json").read_text())
    assert Path(best["checkpoint"], "model.pt").exists()
    assert (storage / "submitted" / "train.config.yaml").exists()


def test_score_job_runs_through_ray_job_submit(cluster, demo_dir, tmp_path):
    """A scoring job on the cluster: every file of the archive, the corrupt one included, is one row."""
    import pandas as pd
    import torch

    from medray.training import checkpoint
    from medray.training.models import build_model

    address, head, log = cluster
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(0)
    meta = {"backbone": "resnet18", "labels": ["Mass", "Effusion"], "task": "multi-label", "in_channels": 1, "image_size": 32}
    checkpoint.save(str(model), {"model": build_model("resnet18", 2, 1).state_dict()}, meta)
    archive = tmp_path / "archive"
    archive.mkdir()
    for image in sorted((demo_dir / "images").glob("*.png"))[:7]:
        (archive / image.name).write_bytes(image.read_bytes())
    (archive / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    output = tmp_path / "scores"
    overrides = ["name=scored", f"storage={tmp_path / 'runs'}", f"score.input={archive}", f"score.output={output}",
                 f"score.checkpoint={model}", "score.part_size=3", "score.batch_size=4"]  # fmt: skip

    done = submit(address, "jobs/score.py", overrides)

    assert head.poll() is None, "the Ray head stopped:\n" + log.read_text()[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "8 inputs: 7 scored, 1 errors" in done.stdout
    rows = pd.read_parquet(output)
    assert len(rows) == 8 and rows["image"].is_unique
    summary = json.loads((output / "_summary.json").read_text())
    assert (summary["inputs"], summary["scored"], summary["errors"], summary["parts"]) == (8, 7, 1, 3)


def test_ray_state_api_in_the_sessions_workers_finds_its_own_cluster_while_another_ray_runs(cluster, ray_session):
    """Ray Train frees a finished run's CPUs through a clean-up actor that asks Ray's state API whether the run's
    controller is alive; with no address that API scans the machine and fails when two Rays run (here: the
    session's and this module's head). Our workers are pinned to their own cluster (medray.runtime.pin_state_api)."""

    @ray_session.remote(num_cpus=0)
    def nodes_the_state_api_sees() -> set[str]:
        from ray.util.state import list_nodes

        return {node.node_id for node in list_nodes()}

    # Raised ConnectionError ("Found multiple active Ray instances") before; now it reaches this session's Ray.
    assert ray_session.get(nodes_the_state_api_sees.remote(), timeout=120) == {n["NodeID"] for n in ray_session.nodes()}
