"""The MLP head, trained with Ray Train: a ``TorchTrainer`` over ``train.workers`` DDP workers (gloo on CPU,
nccl on GPU), as medray's image models train, on the store's vectors instead of images.

The vectors are small (about 2 KB a row at dim 512), so the driver puts the train and val arrays in Ray's
object store once and every worker reads them from there; each epoch every worker draws the same seeded
permutation and takes its own share of it, cut to equal lengths so that DDP's workers step together.
The loss is medray's (``medray.training.losses``: the task's weighted loss, ``loss.*``); every worker
scores the whole val split, so all of them see the same val AUROC, and each epoch leaves a checkpoint
(``<run>/head_mlp/epoch_NNN``). The best by val mean AUROC is the run's; a rerun resumes from the last.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from medray.config import JobConfig
from medray.embeddings.heads import VectorHead
from medray.io import storage
from medray.training import checkpoint, recipe
from medray.training.losses import head_size, probabilities
from medray.training.progress import EpochLines, say
from medray.training.trainer import SCORE, TrainingError, epoch_seed, run_config
from medray.training.validation import auroc_per_label

log = logging.getLogger(__name__)
RUN_NAME = "head_mlp"


def _batches(n: int, world: int, rank: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """This worker's row indices for the epoch, in batches: one permutation for all workers (seeded by the
    epoch), cut to a multiple of the workers so that each takes as many batches as the others."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, 0)))
    mine = order[: n - n % world][rank::world] if n >= world else order
    return list(torch.split(mine, batch_size))


def _loop(cfg: dict) -> None:
    t = cfg["train"]
    torch.manual_seed(t["seed"])
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    x, y, vx, vy = (torch.from_numpy(np.asarray(a)) for a in ray.get(cfg["arrays"]))
    vx = vx.to(device)
    bare = VectorHead(x.shape[1], cfg["outputs"], cfg["hidden"], cfg["dropout"]).standardise_with(x.numpy()).to(device)
    optimizer = torch.optim.AdamW(bare.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    scheduler = recipe.schedule(optimizer, t["epochs"], t["warmup_epochs"])
    first = 0
    if resumed := ray.train.get_checkpoint():
        with resumed.as_directory() as directory:
            state = checkpoint.load_state(directory)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first = state["epoch"] + 1
    model = ray.train.torch.prepare_model(bare)
    loss_fn = cfg["loss"].to(device)

    for epoch in range(first, t["epochs"]):
        model.train()
        loss_sum, seen = 0.0, 0
        for rows in _batches(len(x), world, rank, t["batch_size"], t["seed"], epoch):
            xb, yb = x[rows].to(device), y[rows].to(device)
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(rows), seen + len(rows)
        scheduler.step()
        bare.eval()
        with torch.inference_mode():
            probs = probabilities(cfg["task"], bare(vx)).cpu().numpy()
        per_label = auroc_per_label(vy.numpy(), probs, cfg["labels"])
        known = [v for v in per_label.values() if not np.isnan(v)]
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_samples": seen * world, "val_images": len(vy),
                   SCORE: float(np.mean(known)) if known else float("nan"),
                   **{f"val_auroc/{label}": value for label, value in per_label.items()}}  # fmt: skip
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                state = {
                    "model": bare.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                }
                checkpoint.save(directory, state, {**cfg["meta"], "epoch": epoch, "metrics": metrics})
                saved = ray.train.Checkpoint.from_directory(directory)
                say(cfg["lines"], f"epoch {epoch + 1}/{t['epochs']}: loss {metrics['train_loss']:.4f}, val AUROC {metrics[SCORE]:.3f}")
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch + 1:03d}")


def train_mlp(config: JobConfig, arrays: tuple[np.ndarray, ...], loss, meta: dict) -> tuple[str, dict]:
    """Train the MLP head on ``arrays`` (train vectors, train label columns, val vectors, val label columns)
    with ``loss``; returns the best checkpoint's URI and its metrics. ``meta`` is the checkpoints' ``meta.json``
    (medray.embeddings.heads.head_meta: labels, task, the store's encoder), to which each epoch adds its own."""
    t, h = config.train, config.head
    loop_config = {
        "train": t.model_dump(), "arrays": [ray.put(np.ascontiguousarray(a)) for a in arrays],
        "outputs": head_size(meta["task"], len(meta["labels"])), "hidden": h.hidden, "dropout": h.dropout,
        "task": meta["task"], "labels": meta["labels"], "loss": loss, "meta": meta,
    }  # fmt: skip
    scaling = ray.train.ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker})
    try:
        with EpochLines() as lines:
            trainer = TorchTrainer(
                _loop,
                train_loop_config={**loop_config, "lines": lines.queue},
                scaling_config=scaling,
                run_config=run_config(config, RUN_NAME),
            )
            result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training the MLP head of {config.run_dir} failed: {str(err).strip().splitlines()[-1]}") from err
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise TrainingError(f"training the MLP head of {config.run_dir} reported no checkpoint")
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    return ("s3://" + best.path) if storage.is_s3(config.run_dir) else best.path, metrics
