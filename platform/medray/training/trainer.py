"""Distributed fine-tuning with Ray Train: one ``TorchTrainer``, DDP over N workers.

The driver decodes the train and val splits once with Ray Data (kept in the object store), computes
the loss weights from the training split, and hands each worker its shard of every epoch, shuffled
anew each epoch. Batches travel as uint8 and are augmented on the worker's device (see
medray.training.augment): on a GPU the CPUs could not keep up. Each epoch ends with validation AUROC per
label, computed on the predictions gathered from all workers, and a checkpoint. Submitting the same
run again resumes from its latest checkpoint.

One seed (``train.seed``) governs the initial weights, the shuffle order of every epoch and the
augmentation draws (per epoch and worker). What stays non-deterministic: resampling draws
(``sampling``), the order in which Ray Data's parallel tasks deliver blocks, cuDNN's algorithm
choices on GPU, and the reduction order of DDP's gradient all-reduce. A resumed run's later epochs
get shuffle orders of their own.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from medray.config import JobConfig
from medray.data import resampled
from medray.data.cache import training_data
from medray.data.manifest import Manifest, read_manifest
from medray.data.patches import patch_dataset, patch_frame, patch_labels
from medray.data.sampling import expected_draws
from medray.data.splits import fold_view
from medray.errors import MedrayError
from medray.io import storage
from medray.training import checkpoint, freezing, recipe, tracking
from medray.training.augment import Augment
from medray.training.losses import head_size, make_loss, prior_shift, probabilities
from medray.training.models import build_model, to_input
from medray.training.progress import EpochLines, say
from medray.training.validation import auroc_per_label, sensitivity_at_specificity

log = logging.getLogger(__name__)
SCORE = "val_auroc_mean"


class TrainingError(MedrayError, RuntimeError):
    """Training ended without a result: the workers' errors, once the allowed restarts are spent.
    One line on the command line (``--debug`` for the traceback), exit 1."""

    exit_code = 1


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


def validation_outputs(model, batches, device, amp: bool, task: str, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets of this worker's validation batches, gathered from every worker.

    Batches arrive on the worker's device (Ray Train moves them there), so both sides leave it through
    ``.cpu()`` before they meet numpy, once per epoch rather than once per batch."""
    model.eval()
    probs, targets = [torch.empty((0, n_labels))], [torch.empty((0, n_labels))]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in batches:
            probs.append(probabilities(task, model(to_input(batch["image"], device)).float()).cpu())
            targets.append(batch["labels"].cpu())
    return _gather(torch.cat(probs).numpy()), _gather(torch.cat(targets).numpy())


@dataclass
class Trainee:
    """A model on its device with what trains it — optimizer, schedule, weight average, early stop —
    from scratch or resumed."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    first_epoch: int
    ema: torch.optim.swa_utils.AveragedModel | None
    stop: recipe.EarlyStop

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated, checkpointed and later evaluated and scored."""
        return self.ema.module if self.ema is not None else self.model

    def state(self, epoch: int) -> dict:
        state = {"model": self.evaluated.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": epoch, "early_stop": self.stop.state()}  # fmt: skip
        if self.ema is not None:
            state["trained"] = self.model.state_dict()  # the raw weights training goes on from
        return state


def trainee(config: JobConfig, outputs: int, device: torch.device, state: dict | None = None) -> Trainee:
    """The model moved to ``device`` *before* its optimizer is made and any saved state loaded:
    ``Optimizer.load_state_dict`` casts each state tensor to its parameter's device and dtype, so a
    model still on the CPU would leave a resumed AdamW's moments there while the model trains on the GPU."""
    t, m = config.train, config.model
    model = build_model(m.backbone, outputs, m.in_channels, m.weights, m.weights_sha256)
    if state is not None:
        model.load_state_dict(state.get("trained", state["model"]))
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    # Every parameter is in the optimizer, frozen or not, so that unfreezing later needs no new optimizer.
    optimizer = torch.optim.AdamW(freezing.param_groups(model, t.lr, m.lr_decay), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = recipe.schedule(optimizer, t.epochs, t.warmup_epochs)
    ema = recipe.averaged(model, t.ema, state["model"] if state is not None and "trained" in state else None)
    stop = recipe.EarlyStop(t.patience)
    if state is None:
        return Trainee(model, optimizer, scheduler, 0, ema, stop)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stop = recipe.EarlyStop(t.patience, **state.get("early_stop", {}))
    return Trainee(model, optimizer, scheduler, state["epoch"] + 1, ema, stop)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One stream of augmentation draws per (run seed, epoch, worker): reproducible, never repeated."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def _quiet_console() -> None:
    """Ray Train echoes every report at INFO on the user's terminal; keep its log files, drop the echo."""
    for handler in logging.getLogger("ray.train").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


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

    state = None
    if resumed := ray.train.get_checkpoint():
        with resumed.as_directory() as directory:
            state = checkpoint.load_state(directory)
    run = trainee(config, head_size(task, len(labels)), device, state)
    bare, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    freezing.apply(bare, m.freeze, run.first_epoch, m.freeze_stages, m.unfreeze_every)
    model = ray.train.torch.prepare_model(bare)
    loss_fn = cfg["loss"].to(device)
    augment = Augment(config.data.augment, config.data.augment_params)
    tracker = tracking.Tracker(config) if rank == 0 else None

    for epoch in range(run.first_epoch, t.epochs):
        _record_worker(config.run_dir, rank, epoch, run.first_epoch)
        if freezing.apply(bare, m.freeze, epoch, m.freeze_stages, m.unfreeze_every):
            # DDP registers the trainable parameters when it wraps the model: wrap again after unfreezing,
            # and collect the old wrapper first so that its gradient hooks are gone.
            model = None
            gc.collect()
            model = ray.train.torch.prepare_model(bare)
        freezing.train_mode(bare)
        generator = torch.Generator(device=device).manual_seed(epoch_seed(t.seed, epoch, rank))
        # Summed on the device: reading a loss back every batch would make the GPU wait for the CPU.
        loss_sum = torch.zeros((), device=device)
        unreadable = torch.zeros((), device=device, dtype=torch.int64)
        seen, started = 0, time.perf_counter()
        shard = ray.train.get_dataset_shard("train")
        # uint8 batches, prefetched and copied to the device by Ray; augmented there, per sample.
        # drop_last: resampled epochs vary in length, and a last batch of one image breaks BatchNorm.
        batches = shard.iter_torch_batches(
            batch_size=t.batch_size,
            drop_last=True,
            prefetch_batches=t.prefetch_batches,
            pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=4 * t.batch_size if config.data.shuffle == "local" else None,
        )
        augmented = functools.partial(augment, generator=generator)
        for batch in batches:
            x = to_input(batch["image"], device, augmented)
            y = batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if run.ema is not None:
                run.ema.update_parameters(bare)
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
            unreadable += batch["unreadable"].to(device).sum()
        scheduler.step()
        loss_total = loss_sum.item()  # waits for the device to finish the epoch's work
        seconds = time.perf_counter() - started

        val = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=t.batch_size, prefetch_batches=t.prefetch_batches)
        probs, targets = validation_outputs(run.evaluated, val, device, amp, task, len(labels))
        workers = _gather(np.array([[loss_total, seen, unreadable.item(), seconds]]))
        totals = workers.sum(axis=0)
        per_label = auroc_per_label(targets, probs, labels)
        sens = {label: sensitivity_at_specificity(targets[:, i], probs[:, i], 0.9) for i, label in enumerate(labels)}
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "unreadable_images": int(totals[2]),
            "train_samples": int(totals[1]),
            # The slowest worker sets the pace of a DDP epoch.
            "train_images_per_s": float(totals[1] / max(workers[:, 3].max(), 1e-9)),
            "trainable_parameters": sum(p.numel() for p in bare.parameters() if p.requires_grad),
            "val_images": len(targets),
            SCORE: float(np.nanmean(list(per_label.values()))),
            **{f"val_auroc/{label}": value for label, value in per_label.items()},
            **{f"val_sens_at_spec90/{label}": value for label, value in sens.items()},
            "lr": scheduler.get_last_lr()[0],
        }
        # Every worker gathered the same validation outputs, so all of them stop at the same epoch.
        stop = run.stop.update(metrics[SCORE])
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                state = run.state(epoch)
                meta = {"backbone": m.backbone, "labels": labels, "task": task, "in_channels": m.in_channels,
                        "image_size": config.data.image_size, "epoch": epoch, "metrics": metrics,
                        "prior_shift": prior_shift(cfg["loss"])}  # fmt: skip
                checkpoint.save(directory, state, meta)
                saved = ray.train.Checkpoint.from_directory(directory)
                aurocs = ", ".join(f"{k} {v:.3f}" for k, v in per_label.items())
                say(
                    cfg["lines"],
                    f"epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f}, val AUROC {metrics[SCORE]:.3f} ({aurocs})",
                )
                if stop:
                    say(cfg["lines"], f"early stop: val AUROC has not improved for {t.patience} epochs (best {run.stop.best:.3f})")
            # Named as the logs count epochs: epoch_001 holds the first.
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
        if tracker:
            tracker.log(metrics, epoch)
        if stop:
            break
    if tracker:
        tracker.close()


def run_config(config: JobConfig, name: str, callbacks: list | None = None) -> ray.train.RunConfig:
    """Where a Ray Train run of this job keeps its checkpoints (``<run>/<name>``, the best by val AUROC)
    and how often it may fail: one ``name`` per kind of model, so that none resumes another's checkpoints."""
    fs, path = storage.filesystem(config.run_dir)
    return ray.train.RunConfig(
        name=name,
        callbacks=callbacks,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(config.run_dir) else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.train.checkpoints_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


def shuffled(ds: ray.data.Dataset, how: str, seed: int) -> ray.data.Dataset:
    """The training rows in a new order on every epoch, the same orders for the same seed.

    Manifests are often sorted (by class, as ``--format folder`` writes them, or by patient), and Ray
    Train hands each DDP worker a contiguous part of the stream: without a global shuffle one worker
    could see one class only. ``local`` (block order plus a buffer in the worker) is cheaper for
    archives too large to move every epoch, but mixes only nearby rows."""
    if how == "global":
        return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))


def make_trainer(
    config: JobConfig,
    train_ds: ray.data.Dataset,
    val_ds: ray.data.Dataset,
    labels: list[str],
    task: str,
    loss,
    callbacks: list | None = None,
    resample: bool = False,
    lines=None,
) -> TorchTrainer:
    """The ``TorchTrainer`` that trains ``config``'s model on uint8 image batches (``image``, ``labels``,
    ``unreadable``) from ``train_ds`` and validates on ``val_ds``: images and slide patches alike.
    ``resample``: the training rows carry sampling multiplicities, drawn anew every epoch; ``lines``: the
    queue of an ``EpochLines`` that shows rank 0's epoch lines on the driver."""
    if config.data.cache_decoded:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
    if resample:
        train_ds = resampled(train_ds)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "labels": labels, "task": task, "loss": loss, "lines": lines},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker},
        ),
        run_config=run_config(config, "train", callbacks),
        datasets={"train": shuffled(train_ds, config.data.shuffle, config.train.seed), "val": val_ds},
    )


def build_trainer(config: JobConfig, callbacks: list | None = None, lines=None) -> TorchTrainer:
    """The run's ``TorchTrainer``, its datasets decoded; ``callbacks`` let a Tune trial hear its reports."""
    manifest = read_manifest(config.manifest)
    if config.data.fold is not None:
        manifest = Manifest(fold_view(manifest.frame, config.data.fold), manifest.labels, manifest.task)
    labels = manifest.labels
    train_frame, val_frame = manifest.split("train"), manifest.split("val")
    loss = _loss(config, manifest.task, train_frame[labels].to_numpy(float))
    s = config.sampling
    draws = None
    if s.strategy != "none" or s.samples_per_epoch:
        draws = expected_draws(train_frame, labels, s.strategy, s.label or config.split.label, s.samples_per_epoch)
    log.info("training on %d images, validating on %d", len(train_frame), len(val_frame))

    d, channels = config.data, config.model.in_channels
    source = {"manifest_uri": config.manifest, "size": d.image_size, "channels": channels, "cache_uri": d.cache, "use_cache": d.use_cache}
    train_ds = training_data(manifest, "train", multiplicity=draws, **source)
    val_ds = training_data(manifest, "val", **source)
    return make_trainer(config, train_ds, val_ds, labels, manifest.task, loss, callbacks, resample=draws is not None, lines=lines)


def build_patch_trainer(config: JobConfig, callbacks: list | None = None, lines=None) -> TorchTrainer:
    """The same trainer over whole-slide patches: the shards in ``config.wsi.patches`` (medray.data.patches)."""
    patches = config.wsi.patches
    labels = patch_labels(patches)
    frame = patch_frame(patches, ["split", *labels])
    train_targets = frame.loc[frame["split"] == "train", labels].to_numpy(float)
    if config.sampling.strategy != "none":
        log.warning("sampling.strategy is not applied to patches; cap patches per slide with wsi.max_patches")
    loss = _loss(config, "multi-label", train_targets)
    log.info("training on %d patches, validating on %d", len(train_targets), int((frame["split"] == "val").sum()))
    size, channels = config.data.image_size, config.model.in_channels
    train_ds, val_ds = (patch_dataset(patches, split, labels, size, channels) for split in ("train", "val"))
    return make_trainer(config, train_ds, val_ds, labels, "multi-label", loss, callbacks, lines=lines)


def _loss(config: JobConfig, task: str, train_targets: np.ndarray):
    c = config.loss
    return make_loss(task, train_targets, c.weighting, c.beta, c.focal_gamma, c.label_smoothing)


def _failure(err: ray.train.TrainingFailedError) -> str:
    """The workers' own errors, one line each: what a person needs to see first."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return str(err).strip().splitlines()[-1]
    lines = []
    for rank, error in sorted(failures.items()):
        cause = getattr(error, "cause", None) or error  # Ray wraps the worker's exception
        message = str(cause).strip().splitlines()
        lines.append(f"worker {rank}: {type(cause).__name__}: {message[0] if message else ''}")
    return "; ".join(lines)


def train(config: JobConfig, callbacks: list | None = None) -> TrainResult:
    """Train (or resume) the run; record its best checkpoint by validation mean AUROC."""
    tracking.check(config.tracking)
    build = build_patch_trainer if config.wsi.patches else build_trainer
    try:
        with EpochLines() as lines:
            result = build(config, callbacks, lines.queue).fit()
    except ray.train.TrainingFailedError as err:
        raise TrainingError(f"training run {config.run_dir} failed after {config.train.max_failures} restarts: {_failure(err)}") from err
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise TrainingError(f"training run {config.run_dir} reported no checkpoint")
    best_uri = ("s3://" + best.path) if storage.is_s3(config.run_dir) else best.path
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    checkpoint.write_best(config.run_dir, best_uri, metrics)
    return TrainResult(best_uri, metrics)
