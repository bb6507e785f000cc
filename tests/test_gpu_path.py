"""The GPU path, checked on a CPU: tensors that live on an accelerator, resumed optimizer state on the
model's device, and a failing training run that ends with its workers' error instead of hanging.

CI has no GPU. Two stand-ins make the GPU's rules bite here: the ``meta`` device (tensors with a
device but no data) and ``OnAccelerator``, a CPU tensor that refuses ``.numpy()`` as a CUDA tensor does.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medray.config import build_config
from medray.training.losses import head_size
from medray.training.models import build_model
from medray.training.trainer import TrainingError, train, trainee, validation_outputs

LABELS = ["Mass", "Nodule", "Cardiomegaly", "Effusion"]
REPO = Path(__file__).resolve().parents[1]


class OnAccelerator(torch.Tensor):
    """A tensor as Ray Train hands it to a GPU worker: ``.numpy()`` raises until it is moved with ``.cpu()``."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def on_accelerator(array: np.ndarray) -> OnAccelerator:
    return torch.from_numpy(array).as_subclass(OnAccelerator)


def test_validation_takes_batches_that_live_on_the_accelerator():
    model = build_model("resnet18", len(LABELS), 1)
    rng = np.random.default_rng(0)
    batches = [
        {"image": on_accelerator(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)),
         "labels": on_accelerator(rng.integers(0, 2, (3, len(LABELS))).astype(np.float32))}
        for _ in range(2)
    ]  # fmt: skip
    probs, targets = validation_outputs(model, batches, torch.device("cpu"), False, "multi-label", len(LABELS))
    assert probs.shape == targets.shape == (6, len(LABELS))
    assert np.array_equal(targets, np.concatenate([b["labels"].cpu().numpy() for b in batches]))
    assert ((probs > 0) & (probs < 1)).all()


def saved_state(config, outputs: int) -> dict:
    """What an epoch's checkpoint holds, after a real optimizer step so that AdamW has moments to restore."""
    run = trainee(config, outputs, torch.device("cpu"))
    loss = run.model(torch.rand(2, 1, 32, 32)).square().mean()
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "epoch": 0}


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_resumed_optimizer_keeps_its_state_on_each_parameters_device_and_dtype(device):
    config = build_config({"train": {"epochs": 3}})
    outputs = head_size("multi-label", len(LABELS))
    run = trainee(config, outputs, torch.device(device), saved_state(config, outputs))
    assert run.first_epoch == 1 and run.scheduler.last_epoch == 1
    optimized = [param for group in run.optimizer.param_groups for param in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in run.model.parameters()}, "the optimizer steps the model's own parameters"
    restored = 0
    for group in run.optimizer.param_groups:
        for param in group["params"]:
            for key, value in run.optimizer.state[param].items():
                if key == "step":
                    continue  # AdamW keeps its step count as a CPU scalar by design
                assert value.device == param.device and value.dtype == param.dtype, key
                restored += 1
    assert restored == 2 * sum(1 for p in run.model.parameters() if p.requires_grad), "every parameter's moments came back"
    assert next(run.model.parameters()).device.type == device


@pytest.mark.timeout(300)  # the hang guard: a run that failed must end, not wait
def test_a_run_whose_workers_fail_ends_with_their_error_once_restarts_are_spent(tmp_path, split_manifest_path, ray_session):
    weights = tmp_path / "resnet18.pt"
    weights.write_bytes(b"not a state dict: a download cut short")
    config = build_config({
        "name": "fails", "storage": str(tmp_path / "runs"),
        "data": {"manifest": split_manifest_path, "image_size": 32},
        "model": {"weights": str(weights)},
        "train": {"epochs": 1, "workers": 1, "cpus_per_worker": 0.5, "max_failures": 1},
    })  # fmt: skip
    with pytest.raises(TrainingError, match=r"failed after 1 restarts: worker 0: WeightsError: .*resnet18.pt cannot be loaded"):
        train(config)


@pytest.mark.timeout(300)
def test_a_failed_training_job_exits_1_and_ends_with_the_workers_error_on_one_line(tmp_path, split_manifest_path):
    weights = tmp_path / "resnet18.pt"
    weights.write_bytes(b"not a state dict")
    overrides = [f"storage={tmp_path / 'runs'}", f"data.manifest={split_manifest_path}", "data.image_size=32",
                 f"model.weights={weights}", "train.workers=1", "train.cpus_per_worker=0.5", "train.epochs=1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's first run
    done = subprocess.run([sys.executable, "jobs/train.py", *(a for o in overrides for a in ("--set", o))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("medray train: training run") and "worker 0: WeightsError:" in last, last
    # Ray's actors keep their notices and tracebacks in their log files: none reach the user's console.
    assert not [line for line in done.stdout.splitlines() + done.stderr.splitlines() if " pid=" in line], done.stderr[-2000:]
