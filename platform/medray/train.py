"""Distributed fine-tuning with Ray Train: one ``TorchTrainer``, DDP over N workers.

The driver decodes the train and val splits once with Ray Data (kept in the object store), computes
the loss weights from the training split, and hands each worker its shard of every epoch. Each
epoch ends with validation AUROC per label, computed on the predictions gathered from all workers,
and a checkpoint. Submitting the same run again resumes from its latest checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from medray import checkpoint, freezing, storage, tracking
from medray.cache import training_data
from medray.config import JobConfig
from medray.data import augmented, resampled
from medray.losses import head_size, make_loss, probabilities
from medray.manifest import Manifest, read_manifest
from medray.metrics import auroc_per_label, sensitivity_at_specificity
from medray.models import build_model, to_input
from medray.sampling import expected_draws
from medray.splits import fold_view

log = logging.getLogger(__name__)
SCORE = "val_auroc_mean"


@dataclass
class TrainResult:
    best_checkpoint: str
    metrics: dict


def _gather(local: np.ndarray) -> np.ndarray:
    """Rows from every worker, so validation metrics cover the whole split, not one shard."""
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if len(p)])


def _validate(model, shard, batch_size: int, device, amp: bool, task: str, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, targets = [np.empty((0, n_labels))], [np.empty((0, n_labels))]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in shard.iter_torch_batches(batch_size=batch_size):
            probs.append(probabilities(task, model(to_input(batch["image"], device))).cpu().numpy())
            targets.append(batch["labels"].numpy())
    return _gather(np.concatenate(probs)), _gather(np.concatenate(targets))


def _quiet_console() -> None:
    """Ray Train echoes every report at INFO on the user's terminal; keep its log files, drop the echo."""
    for handler in logging.getLogger("ray.train").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _progress(line: str) -> None:
    # Ray Train's patched print() writes twice when stdout is wrapped, as it is in Ray workers.
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _record_worker(run_dir: str, rank: int, epoch: int, first_epoch: int) -> None:
    """``<run>/workers/rank<r>-pid<p>.json``: which process runs which epoch, so an operator (or a test)
    can see restarts and which epoch a restarted worker group resumed from."""
    status = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "epoch": epoch, "first_epoch": first_epoch}
    storage.write_text(storage.join(run_dir, "workers", f"rank{rank}-pid{os.getpid()}.json"), json.dumps(status))


def _worker_loop(cfg: dict) -> None:
    _quiet_console()
    config = JobConfig.model_validate(cfg["config"])
    labels, task, t, m = cfg["labels"], cfg["task"], config.train, config.model
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    amp = t.amp and device.type == "cuda"
    rank = ray.train.get_context().get_world_rank()

    model = build_model(m.backbone, head_size(task, len(labels)), m.in_channels, m.weights, m.weights_sha256)
    # Every parameter is in the optimizer, frozen or not, so that unfreezing later needs no new optimizer.
    optimizer = torch.optim.AdamW(freezing.param_groups(model, t.lr, m.lr_decay), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    start = 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as directory:
            state = checkpoint.load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    bare = model
    freezing.apply(bare, m.freeze, start, m.freeze_stages, m.unfreeze_every)
    model = ray.train.torch.prepare_model(bare)
    loss_fn = cfg["loss"].to(device)
    tracker = tracking.Tracker(config) if rank == 0 else None

    for epoch in range(start, t.epochs):
        _record_worker(config.run_dir, rank, epoch, start)
        if freezing.apply(bare, m.freeze, epoch, m.freeze_stages, m.unfreeze_every):
            # DDP registers the trainable parameters when it wraps the model: wrap again after unfreezing,
            # and collect the old wrapper first so that its gradient hooks are gone.
            model = None
            gc.collect()
            model = ray.train.torch.prepare_model(bare)
        freezing.train_mode(bare)
        loss_sum, seen, unreadable = 0.0, 0, 0
        shard = ray.train.get_dataset_shard("train")
        # drop_last: resampled epochs vary in length, and a last batch of one image breaks BatchNorm.
        batches = shard.iter_torch_batches(batch_size=t.batch_size, local_shuffle_buffer_size=4 * t.batch_size, drop_last=True)
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(to_input(batch["image"], device)), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(batch["labels"]), seen + len(batch["labels"])
            unreadable += int(batch["unreadable"].sum())
        scheduler.step()

        probs, targets = _validate(model, ray.train.get_dataset_shard("val"), t.batch_size, device, amp, task, len(labels))
        totals = _gather(np.array([[loss_sum, seen, unreadable]])).sum(axis=0)
        per_label = auroc_per_label(targets, probs, labels)
        sens = {label: sensitivity_at_specificity(targets[:, i], probs[:, i], 0.9) for i, label in enumerate(labels)}
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "unreadable_images": int(totals[2]),
            "train_samples": int(totals[1]),
            "trainable_parameters": sum(p.numel() for p in bare.parameters() if p.requires_grad),
            "val_images": len(targets),
            SCORE: float(np.nanmean(list(per_label.values()))),
            **{f"val_auroc/{label}": value for label, value in per_label.items()},
            **{f"val_sens_at_spec90/{label}": value for label, value in sens.items()},
        }
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                state = {
                    "model": bare.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                }
                meta = {"backbone": m.backbone, "labels": labels, "task": task, "in_channels": m.in_channels,
                        "image_size": config.data.image_size, "epoch": epoch, "metrics": metrics}  # fmt: skip
                checkpoint.save(directory, state, meta)
                saved = ray.train.Checkpoint.from_directory(directory)
                aurocs = ", ".join(f"{k} {v:.3f}" for k, v in per_label.items())
                _progress(f"epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f}, val AUROC {metrics[SCORE]:.3f} ({aurocs})")
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch:03d}")
        if tracker:
            tracker.log(metrics, epoch)
    if tracker:
        tracker.close()


def _run_config(config: JobConfig, callbacks: list | None) -> ray.train.RunConfig:
    fs, path = storage.filesystem(config.run_dir)
    return ray.train.RunConfig(
        name="train",
        callbacks=callbacks,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(config.run_dir) else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.train.checkpoints_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


def build_trainer(config: JobConfig, callbacks: list | None = None) -> TorchTrainer:
    """The run's ``TorchTrainer``, its datasets decoded; ``callbacks`` let a Tune trial hear its reports."""
    manifest = read_manifest(config.manifest)
    if config.data.fold is not None:
        manifest = Manifest(fold_view(manifest.frame, config.data.fold), manifest.labels, manifest.task)
    labels = manifest.labels
    train_frame, val_frame = manifest.split("train"), manifest.split("val")
    loss = make_loss(manifest.task, train_frame[labels].to_numpy(float), config.loss.weighting, config.loss.beta, config.loss.focal_gamma)
    s = config.sampling
    draws = None
    if s.strategy != "none" or s.samples_per_epoch:
        draws = expected_draws(train_frame, labels, s.strategy, s.label or config.split.label, s.samples_per_epoch)
    log.info("training on %d images, validating on %d", len(train_frame), len(val_frame))

    d, channels = config.data, config.model.in_channels
    source = {"manifest_uri": config.manifest, "size": d.image_size, "channels": channels, "cache_uri": d.cache, "use_cache": d.use_cache}
    train_ds = training_data(manifest, "train", multiplicity=draws, **source)
    val_ds = training_data(manifest, "val", **source)
    if config.data.cache_decoded:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    if draws is not None:
        train_ds = resampled(train_ds)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "labels": labels, "task": manifest.task, "loss": loss},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker},
        ),
        run_config=_run_config(config, callbacks),
        datasets={"train": augmented(train_ds, config.data.augment, config.data.augment_params), "val": val_ds},
    )


def train(config: JobConfig, callbacks: list | None = None) -> TrainResult:
    """Train (or resume) the run; record its best checkpoint by validation mean AUROC."""
    tracking.check(config.tracking)
    build = build_trainer
    if config.wsi.patches:  # whole-slide images: patches from Parquet shards (medray.wsi.training)
        from medray.wsi.training import build_patch_trainer as build
    result = build(config, callbacks).fit()
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise RuntimeError(f"training run {config.run_dir} reported no checkpoint")
    best_uri = ("s3://" + best.path) if storage.is_s3(config.run_dir) else best.path
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    checkpoint.write_best(config.run_dir, best_uri, metrics)
    return TrainResult(best_uri, metrics)
