"""Training attention-MIL (medray.wsi.mil) with Ray Train: one ``TorchTrainer``, DDP over N workers.

The driver reads the embedding store once, groups its patches into bags and puts them in Ray's
object store, where every worker reads them without a copy. Each epoch the training bags are shuffled
(seeded by ``train.seed`` and the epoch) and dealt out, the same number to every worker — the order is
padded by repeating its first bags, as torch's ``DistributedSampler`` does — so that DDP's all-reduce
never waits on a worker that ran out. A bag larger than ``mil.bag_size`` is sampled afresh every epoch.

Validation scores every validation bag whole on every worker: the weights are the same on all of
them under DDP, a bag is a few matrix products, and so every worker agrees on the epoch's score and on
early stopping without gathering anything. Checkpoints are ranked by the mean validation AUROC per bag
(slide or patient). The learning-rate schedule and early stopping are the image trainer's
(medray.training.recipe), the loss its weighted multi-label loss (medray.training.losses).
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from medray.config import JobConfig
from medray.io import storage
from medray.training import checkpoint, recipe, tracking
from medray.training.losses import make_loss, prior_shift
from medray.training.progress import EpochLines, say
from medray.training.trainer import SCORE, TrainingError, TrainResult, epoch_seed, run_config
from medray.training.validation import auroc_per_label
from medray.wsi import mil

log = logging.getLogger(__name__)


def deal(bags: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This worker's training bags for ``epoch``: a seeded shuffle, padded to a multiple of ``world``."""
    order = bags[np.random.default_rng([seed, epoch]).permutation(len(bags))]
    order = np.resize(order, -(-len(order) // world) * world)
    return order[rank::world]


def _resume(bare, optimizer, scheduler, patience) -> tuple[int, recipe.EarlyStop]:
    """The epoch to start from and the early-stop state: from Ray Train's latest checkpoint, if any."""
    resumed = ray.train.get_checkpoint()
    if not resumed:
        return 0, recipe.EarlyStop(patience)
    with resumed.as_directory() as directory:
        state = checkpoint.load_state(directory)
    bare.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, recipe.EarlyStop(patience, **state["early_stop"])


def _train_epoch(model, optimizer, loss_fn, data: dict, mine: np.ndarray, config: JobConfig, epoch: int, rank: int, device) -> float:
    """One pass over this worker's bags, ``mil.bags_per_step`` at a time; the mean loss per bag."""
    t, m = config.train, config.mil
    model.train()
    torch.manual_seed(epoch_seed(t.seed, epoch, rank))  # dropout draws: one stream per epoch and worker
    loss_sum = torch.zeros((), device=device)  # summed on the device: no wait for it after every step
    for i in range(0, len(mine), m.bags_per_step):
        chosen = mine[i : i + m.bags_per_step]
        rows = [mil.sample(int(data["lengths"][b]), m.bag_size, t.seed, epoch, int(b)) for b in chosen]
        x, mask = mil.batch(data["vectors"], data["starts"][chosen], rows, device)
        logits, _ = model(x, mask)
        loss = loss_fn(logits, torch.from_numpy(data["targets"][chosen]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(chosen)
    return float(loss_sum.item() / max(len(mine), 1))


def _worker_loop(cfg: dict) -> None:
    config = JobConfig.model_validate(cfg["config"])
    t, m, labels = config.train, config.mil, cfg["labels"]
    data = ray.get(cfg["bags"])
    vectors, starts, lengths, targets = data["vectors"], data["starts"], data["lengths"], data["targets"]
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    torch.manual_seed(t.seed)  # the same initial weights on every worker and in every run of this seed
    bare = mil.build(cfg["meta"]).to(device)
    optimizer = torch.optim.AdamW(bare.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = recipe.schedule(optimizer, t.epochs, t.warmup_epochs)
    first_epoch, stopper = _resume(bare, optimizer, scheduler, t.patience)
    model = ray.train.torch.prepare_model(bare)
    loss_fn = cfg["loss"].to(device)
    tracker = tracking.Tracker(config) if rank == 0 else None

    for epoch in range(first_epoch, t.epochs):
        mine = deal(data["train"], t.seed, epoch, rank, world)
        started = time.perf_counter()
        loss = _train_epoch(model, optimizer, loss_fn, data, mine, config, epoch, rank, device)
        scheduler.step()
        seconds = time.perf_counter() - started

        probs, _ = mil.predict(bare, vectors, starts, lengths, data["val"], device)
        per_label = auroc_per_label(targets[data["val"]], probs, labels)
        known = [v for v in per_label.values() if not np.isnan(v)]
        metrics = {
            "epoch": epoch,
            "train_loss": loss,  # this worker's; rank 0's is the one Ray Train keeps
            "train_bags": int(len(mine) * world),
            "train_bags_per_s": float(len(mine) / max(seconds, 1e-9) * world),
            "val_bags": int(len(data["val"])),
            SCORE: float(np.mean(known)) if known else float("nan"),
            **{f"val_auroc/{label}": value for label, value in per_label.items()},
            "lr": scheduler.get_last_lr()[0],
        }
        stop = stopper.update(metrics[SCORE])
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                state = {"model": bare.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "early_stop": stopper.state()}  # fmt: skip
                checkpoint.save(
                    directory, state, {**cfg["meta"], "epoch": epoch, "metrics": metrics, "prior_shift": prior_shift(cfg["loss"])}
                )
                saved = ray.train.Checkpoint.from_directory(directory)
                aurocs = ", ".join(f"{k} {v:.3f}" for k, v in per_label.items())
                say(
                    cfg["lines"],
                    f"epoch {epoch + 1}/{t.epochs}: loss {metrics['train_loss']:.4f}, val AUROC per {m.level} {metrics[SCORE]:.3f} ({aurocs})",
                )
                if stop:
                    say(cfg["lines"], f"early stop: val AUROC has not improved for {t.patience} epochs (best {stopper.best:.3f})")
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
        if tracker:
            tracker.log(metrics, epoch)
        if stop:
            break
    if tracker:
        tracker.close()


def train_mil(config: JobConfig) -> TrainResult:
    """Train (or resume) attention-MIL on ``config.embeddings``; record its best checkpoint by val AUROC."""
    tracking.check(config.tracking)
    store = mil.read_patch_store(config.embeddings)
    bags = mil.make_bags(store, config.mil.level, config.embeddings)
    train_bags, val_bags = bags.where("train"), bags.where("val")
    if not len(train_bags) or not len(val_bags):
        raise mil.MilError(f"{config.embeddings}: {len(train_bags)} training and {len(val_bags)} validation bags; both splits need slides")
    c = config.loss
    loss = make_loss("multi-label", bags.targets[train_bags], c.weighting, c.beta, c.focal_gamma, c.label_smoothing)
    log.info(
        "attention-MIL on %d training and %d validation bags (per %s), %d patches",
        len(train_bags),
        len(val_bags),
        bags.level,
        len(bags.frame),
    )
    t = config.train
    with EpochLines() as lines:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "labels": bags.labels,
                "meta": mil.checkpoint_meta(config, bags),
                "bags": ray.put(bags.arrays()),
                "loss": loss,
                "lines": lines.queue,
            },  # fmt: skip
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            run_config=run_config(config, "mil"),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            cause = str(err).strip().splitlines()
            raise TrainingError(
                f"training run {config.run_dir} failed after {t.max_failures} restarts: {cause[-1] if cause else err}"
            ) from err
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise TrainingError(f"training run {config.run_dir} reported no checkpoint")
    best_uri = ("s3://" + best.path) if storage.is_s3(config.run_dir) else best.path
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    checkpoint.write_best(config.run_dir, best_uri, metrics)
    return TrainResult(best_uri, metrics)
