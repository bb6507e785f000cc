"""Attention-MIL on a store of slide patch embeddings: it finds the few patches that make a slide positive.

The store is written as ``medray embed`` writes one (``store.to_table`` + ``store.part_bytes``): random
vectors, where a positive slide's few tumour patches (2–4 of 20–120) carry a direction of their own and
every slide has a random offset of its own, as stain and scanner give real slides.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medray import jobs
from medray.config import build_config
from medray.embeddings.store import StoreError, StoreInfo, part_bytes, to_table
from medray.io import storage
from medray.training import checkpoint
from medray.wsi import demo_slides, mil
from medray.wsi.extract import slide_key
from medray.wsi.job import extract_job
from medray.wsi.mil_figures import PER_PAGE
from medray.wsi.mil_train import deal

LABELS = ["tumour", "necrosis"]
DIM, PATCH, GRID = 16, 128, (16, 12)  # a slide is a 16 × 12 grid of 128 px patches; thumbnails at 1/16


def write_store(out, patients: int = 100, seed: int = 0, kind: str = "patches") -> pd.DataFrame:
    """One slide per patient (two for every third patient); a fifth of the patients in val, a fifth in test;
    60 % of the slides annotated (tumour_fraction known), the rest NaN."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:, :2].T
    frames, vectors = [], []
    for p in range(patients):
        split = ["train", "train", "train", "val", "test"][p % 5]
        for _ in range(1 + (p % 3 == 0)):
            slide = len(frames)
            y = np.array([rng.random() < 0.5, rng.random() < 0.3], np.float32)
            n = int(rng.integers(20, 120))
            x = rng.standard_normal((n, DIM)) + rng.normal(0, 0.5, DIM)
            tumour = np.zeros(n, np.float32)
            for k in np.flatnonzero(y):
                hit = rng.choice(n, int(rng.integers(2, 5)), replace=False)
                x[hit] += 5.0 * directions[k]
                if k == 0:
                    tumour[hit] = rng.uniform(0.6, 1.0, len(hit))
            cells = rng.choice(GRID[0] * GRID[1], n, replace=False)
            frames.append(
                pd.DataFrame(
                    {
                        "image": f"/slides/s{slide:03d}.tif",
                        "slide_id": f"s{slide:03d}",
                        "patient_id": f"P{p:03d}",
                        "split": split,
                        "x": cells % GRID[0] * PATCH,
                        "y": cells // GRID[0] * PATCH,
                        "level": 0,
                        "size": PATCH,
                        "tumour_fraction": tumour if rng.random() < 0.6 else np.nan,
                        "tumour": y[0],
                        "necrosis": y[1],
                    }
                )  # fmt: skip
            )
            vectors.append(x)
    frame = pd.concat(frames, ignore_index=True).astype({"tumour_fraction": np.float32, "tumour": np.float32, "necrosis": np.float32})
    info = StoreInfo("resnet18", DIM, "ab" * 32, 224, kind)
    storage.write_bytes(str(out / "part-00000.parquet"), part_bytes(to_table(frame, np.concatenate(vectors), LABELS, "multi-label", info)))
    return frame


def write_patch_folder(out, frame: pd.DataFrame) -> None:
    """What extract-patches leaves beside its shards for the heatmaps: ``slides.parquet`` and ``thumbs/<key>.png``."""
    slides = frame.groupby("image", as_index=False)[["slide_id", "patient_id", "split"]].first()
    slides["thumb_downsample"] = 16.0
    (out / "thumbs").mkdir(parents=True)
    slides.to_parquet(out / "slides.parquet", index=False)
    for uri in slides["image"]:
        Image.new("RGB", (GRID[0] * PATCH // 16, GRID[1] * PATCH // 16), (232, 160, 196)).save(out / "thumbs" / f"{slide_key(uri)}.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """ABMIL trained with Ray Train (1 worker, 8 epochs) on 134 slides of 100 patients, then evaluated."""
    folder = tmp_path_factory.mktemp("mil")
    (folder / "embeddings").mkdir()
    frame = write_store(folder / "embeddings")
    write_patch_folder(folder / "patches", frame)
    config = build_config(
        {"name": "abmil", "storage": str(folder / "runs"), "model": {"head": "abmil"},
         "embed": {"output": str(folder / "embeddings")}, "wsi": {"patches": str(folder / "patches"), "tumour_label": "tumour"},
         "mil": {"bag_size": 64, "hidden": 32, "attention": 16, "dropout": 0.1},
         "train": {"workers": 1, "epochs": 8, "lr": 0.002, "seed": 0},
         "evaluate": {"bootstrap": 200}, "tracking": {"tensorboard": False}}
    )  # fmt: skip
    trained = jobs.train(config)
    return config, frame, trained, jobs.evaluate(config)


def test_abmil_finds_the_few_tumour_patches_that_make_a_slide_positive_where_mean_pooling_cannot(run):
    _, _, trained, evaluation = run
    abmil, pooled = evaluation.table.loc["tumour", "auroc"], evaluation.summary["baseline_auroc"]["tumour"]
    assert trained.metrics["val_auroc/tumour"] > 0.9
    assert abmil > 0.9 and abmil > pooled + 0.15, (abmil, pooled)
    # On the annotated test slides its attention ranks the tumour patches above the others.
    assert evaluation.summary["attention_slides"] >= 3 and evaluation.summary["attention_auroc"] > 0.8


def test_the_slide_metrics_come_with_patient_intervals_and_val_thresholds_and_every_test_slide_gets_a_heatmap(run):
    config, frame, _, evaluation = run
    table, paths = evaluation.table, evaluation.paths
    assert table.loc["tumour", "auroc_lo"] <= table.loc["tumour", "auroc"] <= table.loc["tumour", "auroc_hi"]
    test_slides = frame.loc[frame["split"] == "test", "slide_id"].nunique()
    assert table.loc["tumour", "n"] == test_slides  # one row per slide
    assert table.loc["tumour", "positive_patients"] == frame[(frame["split"] == "test") & (frame["tumour"] == 1)]["patient_id"].nunique()
    report = storage.read_text(paths["report.md"])
    last = (test_slides - 1) // PER_PAGE * PER_PAGE + 1
    assert f"Attention over the test slides (1–{PER_PAGE} of {test_slides})" in report  # a panel per test slide
    assert f"Attention over the test slides ({last}–{test_slides} of {test_slides})" in report
    assert {"roc.png", "attention_1.png"} <= set(paths) and Image.open(paths["attention_1.png"]).size[0] > 600
    metrics = json.loads(storage.read_text(paths["metrics.json"]))
    assert metrics["attention_auroc"] == pytest.approx(evaluation.summary["attention_auroc"])
    versus = metrics["baseline"]["tumour"]  # the comparison with mean pooling, as the report shows it
    assert versus["mean_pooling_auroc_lo"] <= versus["mean_pooling_auroc"] == pytest.approx(metrics["baseline_auroc"]["tumour"])
    assert versus["difference_lo"] <= versus["difference"] <= versus["difference_hi"] and 0 <= versus["delong_p"] <= 1
    attention = pd.read_parquet(paths["attention"])
    assert len(attention) == (frame["split"] != "train").sum()  # every held-out patch, none capped
    sums = attention.groupby("image")["attention_tumour"].sum()
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)


def test_the_best_checkpoint_reloads_with_weights_only_and_scores_as_evaluation_did(run):
    config, _, trained, evaluation = run
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(trained.best_checkpoint, "model.pt"))), weights_only=True)
    model, meta = mil.load(checkpoint.resolve(None, config.run_dir))
    assert meta["head"] == "abmil" and meta["labels"] == LABELS and meta["embedding"]["kind"] == "patches"
    assert set(state["model"]) == set(model.state_dict())
    bags = mil.make_bags(mil.read_patch_store(config.embeddings))
    test = bags.where("test")
    probs, _ = mil.predict(model, bags.vectors, bags.starts, bags.lengths, test, "cpu")
    saved = pd.read_parquet(evaluation.paths["predictions"]).set_index("key")
    np.testing.assert_allclose(probs[:, 0], saved.loc[bags.table["key"].iloc[test], "prob_tumour"], atol=1e-5)


def test_abmil_learns_bags_where_a_single_instance_makes_the_bag_positive_and_attends_to_that_instance():
    """The MIL assumption at its hardest: a positive bag of 40 instances holds exactly one positive instance.
    Mean pooling dilutes it 40-fold below the noise; attention finds it."""
    rng = np.random.default_rng(0)
    n_bags, size, dim = 240, 40, DIM
    direction = np.linalg.qr(rng.standard_normal((dim, 1)))[0][:, 0]
    vectors = rng.standard_normal((n_bags * size, dim)).astype(np.float32)
    labels = (np.arange(n_bags) % 2).astype(np.float32)
    starts, lengths = np.arange(n_bags) * size, np.full(n_bags, size)
    the_one = starts + rng.integers(0, size, n_bags)
    vectors[the_one[labels == 1]] += 6.0 * direction
    train, test = np.arange(160), np.arange(160, n_bags)

    torch.manual_seed(0)
    model = mil.GatedAttentionMIL(dim, 1, hidden=32, attention=16, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, mask = mil.batch(vectors, starts[train], [np.arange(size)] * len(train), "cpu")
    for _ in range(150):
        model.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, mask)[0], torch.from_numpy(labels[train, None]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    probs, attention = mil.predict(model, vectors, starts, lengths, test, "cpu")
    assert roc_auc_score(labels[test], probs[:, 0]) > 0.95
    found = [attention[i][:, 0].argmax() == the_one[b] - starts[b] for i, b in enumerate(test) if labels[b]]
    assert np.mean(found) > 0.9, np.mean(found)
    # The same bags mean-pooled: the one instance is diluted 40-fold, and a linear classifier falls far behind.
    means = vectors.reshape(n_bags, size, dim).mean(axis=1)
    pooled = LogisticRegression().fit(means[train], labels[train]).predict_proba(means[test])[:, 1]
    assert roc_auc_score(labels[test], pooled) < 0.8, roc_auc_score(labels[test], pooled)


def test_a_bag_larger_than_the_cap_is_sampled_afresh_each_epoch_the_same_way_for_the_same_seed():
    first, second = mil.sample(300, 64, seed=0, epoch=0, bag=7), mil.sample(300, 64, seed=0, epoch=1, bag=7)
    assert len(first) == 64 and len(np.unique(first)) == 64 and first.max() < 300
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, mil.sample(300, 64, seed=0, epoch=0, bag=7))
    assert not np.array_equal(first, mil.sample(300, 64, seed=1, epoch=0, bag=7))
    np.testing.assert_array_equal(mil.sample(40, 64, seed=0, epoch=0, bag=7), np.arange(40))  # under the cap: every patch
    # Two workers get the same number of bags every epoch (DDP steps in lockstep), between them every bag.
    bags = np.arange(11)
    ranks = [deal(bags, 0, 3, rank, 2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6 and set(np.concatenate(ranks)) == set(bags)


def test_a_bag_scores_the_same_alone_or_padded_beside_others_and_its_attention_sums_to_one(tmp_path):
    write_store(tmp_path, patients=10)
    bags = mil.make_bags(mil.read_patch_store(str(tmp_path)))
    torch.manual_seed(0)
    model = mil.GatedAttentionMIL(DIM, len(LABELS), hidden=8, attention=4)
    every = np.arange(len(bags.table))
    together, attention = mil.predict(model, bags.vectors, bags.starts, bags.lengths, every, "cpu")
    alone, _ = mil.predict(model, bags.vectors, bags.starts, bags.lengths, every, "cpu", patches=1)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    assert [len(a) for a in attention] == list(bags.lengths)
    np.testing.assert_allclose([a.sum(axis=0) for a in attention], 1.0, atol=1e-5)


def test_a_store_of_whole_images_or_without_a_split_or_none_at_all_is_refused_in_one_line(tmp_path):
    nowhere = build_config({"storage": str(tmp_path / "runs"), "model": {"head": "abmil"}, "embed": {"output": str(tmp_path / "none")}})
    with pytest.raises(StoreError, match="run `medray embed` first"):
        jobs.train(nowhere)
    write_store(tmp_path, patients=5, kind="images")
    with pytest.raises(StoreError, match="not of slide patches"):
        mil.read_patch_store(str(tmp_path))
    write_store(tmp_path, patients=5)
    store = mil.read_patch_store(str(tmp_path))
    store.frame["split"] = ""
    with pytest.raises(mil.MilError, match="without a split"):
        mil.make_bags(store, "slide", str(tmp_path))


def colour_statistics(png: bytes) -> np.ndarray:
    """A stand-in for a frozen backbone on real patches: mean and spread of each channel, and the shares of
    dark (nucleus) and very dark (tumour nucleus) pixels."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255
    brightness = rgb.sum(-1)
    return np.concatenate([rgb.mean((0, 1)), rgb.std((0, 1)), [(brightness < 1.4).mean(), (brightness < 0.9).mean()]])


def test_on_real_slides_attention_lies_over_each_test_slides_thumbnail_and_is_scored_against_its_annotation(tmp_path, ray_session):
    demo_slides.generate(str(tmp_path / "slides"), slides=16, width=640, height=480, seed=3, masks=1.0)
    config = build_config(
        {"name": "real", "storage": str(tmp_path / "runs"), "model": {"head": "abmil"}, "embed": {"output": str(tmp_path / "embeddings")},
         "split": {"val": 0.25, "test": 0.25, "min_positive": 0.3, "label": "tumour", "train_keeps_positive": 0.0},
         "wsi": {"slides": str(tmp_path / "slides" / "slides.csv"), "patches": str(tmp_path / "patches"), "patch_size": 32,
                 "labels_from": "annotation", "thumbnail_side": 128, "min_region_um2": 2000},
         "mil": {"bag_size": 16, "hidden": 16, "attention": 8, "baseline": False},
         "train": {"workers": 1, "epochs": 8, "lr": 0.005}, "evaluate": {"bootstrap": 50}, "tracking": {"tensorboard": False}}
    )  # fmt: skip
    extract_job(config, progress=False)
    patches = pd.read_parquet(tmp_path / "patches" / "patches")
    columns = ["image", "slide_id", "patient_id", "split", "x", "y", "level", "size", "tumour_fraction", "tumour"]
    vectors = np.stack([colour_statistics(png) for png in patches["patch"]])
    vectors = (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-6)  # a backbone's features are of order one
    (tmp_path / "embeddings").mkdir()
    table = to_table(patches[columns], vectors, ["tumour"], "multi-label", StoreInfo("colour-statistics", 8, "00" * 32, 32, "patches"))
    storage.write_bytes(str(tmp_path / "embeddings" / "part-00000.parquet"), part_bytes(table))

    jobs.train(config)
    evaluation = jobs.evaluate(config)

    test = patches[patches["split"] == "test"]
    assert evaluation.table.loc["tumour", "n"] == test["slide_id"].nunique() >= 2
    report = storage.read_text(evaluation.paths["report.md"])
    assert f"Attention over the test slides (1–{test['slide_id'].nunique()} of {test['slide_id'].nunique()})" in report
    attention = pd.read_parquet(evaluation.paths["attention"]).query("split == 'test'")
    # The truth of the attention AUROC is the annotation masks', as extraction measured them patch by patch.
    truth = [f.set_index(["image", "x", "y"])["tumour_fraction"].sort_index() for f in (attention, test)]
    pd.testing.assert_series_equal(*truth)
    annotated = test[test["tumour_fraction"] >= 0.5]["slide_id"].nunique()
    assert evaluation.summary["attention_slides"] == annotated >= 1 and 0 <= evaluation.summary["attention_auroc"] <= 1
