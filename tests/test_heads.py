"""Heads on embeddings (model.head: linear, knn, mlp): each learns a store whose vectors carry the labels,
saves as a checkpoint that reloads without pickle, and is evaluated as an image model is."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medray.cli import main
from medray.config import build_config
from medray.embeddings import heads
from medray.embeddings.head_runs import train_head
from medray.embeddings.store import StoreInfo, part_bytes, read_store, to_table
from medray.evaluation import calibration
from medray.evaluation.metrics import choose_threshold
from medray.io import storage
from medray.training import checkpoint
from medray.training.validation import auroc

LABELS = ["Effusion", "Mass"]
INFO = StoreInfo(backbone="resnet18", dim=16, weights_sha256="cd" * 32, image_size=64)


def write_store(folder: Path, labels=LABELS, task="multi-label", info=INFO, patients=60, per_patient=3, seed=0) -> str:
    """A store whose vectors carry the labels: each label (or class) moves a vector along a direction of its own,
    plus Gaussian noise and a per-patient offset; patients split 3:1:1 into train, val and test; a few Mass labels
    unknown and one test image that could not be embedded; written as two parts, as `medray embed` writes them."""
    rng = np.random.default_rng(seed)
    n = patients * per_patient
    patient = np.repeat(np.arange(patients), per_patient)
    split = np.array(["train", "train", "train", "val", "test"])[patient % 5]
    if task == "multi-label":
        y = (rng.random((n, len(labels))) < 0.4).astype(np.float32)
    else:
        y = np.eye(len(labels), dtype=np.float32)[rng.integers(0, len(labels), n)]
    directions = rng.normal(size=(len(labels), info.dim)) * (0.7 if task == "multi-label" else 1.2)
    vectors = rng.normal(size=(n, info.dim)) + y @ directions + 0.3 * rng.normal(size=(patients, info.dim))[patient]
    if task == "multi-label":
        y[rng.random(n) < 0.05, 1] = np.nan
    frame = pd.DataFrame({"image": [f"/archive/img{i:04d}.png" for i in range(n)], "patient_id": [f"p{p:03d}" for p in patient],
                          "split": split, "sex": np.where(patient % 2, "F", "M"), **{label: y[:, i] for i, label in enumerate(labels)}})  # fmt: skip
    frame["error"] = ""
    frame.loc[np.flatnonzero(split == "test")[0], "error"] = "could not decode"
    folder.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(np.array_split(np.arange(n), 2)):
        table = to_table(frame.iloc[part], vectors[part], labels, task, info)
        storage.write_bytes(str(folder / f"part-{index:05d}.parquet"), part_bytes(table))
    return str(folder)


def job(root: Path, store: str, kind: str, **sections):
    raw = {"name": f"{kind}-run", "storage": str(root), "model": {"head": kind}, "embed": {"output": store},
           "evaluate": {"bootstrap": 100}, **sections}  # fmt: skip
    return build_config(raw)


def test_auroc(head: heads.Head, store_uri: str) -> dict[str, float]:
    frame, vectors = read_store(store_uri).split("test")
    probs = head.probabilities(vectors)
    return {label: auroc(frame[label], probs[:, i]) for i, label in enumerate(head.labels)}


test_auroc.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_store(tmp_path_factory.mktemp("store") / "embeddings")


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_a_linear_or_knn_head_learns_the_store_and_is_the_runs_best_checkpoint(kind, store, tmp_path):
    config = job(tmp_path, store, kind)

    result = train_head(config)

    head, meta = heads.load_head(result.best_checkpoint)
    assert checkpoint.resolve(None, config.run_dir) == result.best_checkpoint
    assert min(test_auroc(head, store).values()) > 0.9
    assert result.metrics["val_auroc_mean"] > 0.9
    assert meta["head"] == kind and meta["labels"] == LABELS and meta["embedding"]["weights_sha256"] == INFO.weights_sha256
    if kind == "linear":  # C chosen per label on val, and the loss weighting's shift recorded for calibration
        assert len(meta["C"]) == 2 and set(meta["C"]) <= set(heads.C_GRID) and len(meta["prior_shift"]) == 2


@pytest.mark.parametrize("task", ["multi-class", "ordinal"])
def test_a_linear_head_on_one_class_per_image_gives_class_probabilities_that_sum_to_one(task, tmp_path):
    uri = write_store(tmp_path / "classes", ["grade0", "grade1", "grade2"], task)
    head, _ = heads.fit_linear(read_store(uri), uri, "seed", 0.999)
    _, vectors = read_store(uri).split("test")
    probs = head.probabilities(vectors)
    assert probs.shape == (len(vectors), 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert min(test_auroc(head, uri).values()) > 0.85


def test_knn_with_k_1_gives_each_query_the_labels_of_its_nearest_train_vector(store):
    embeddings = read_store(store)
    train, vectors = embeddings.split("train")
    head = heads.fit_knn(embeddings, k=1, weights="distance")
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(vectors), 20, replace=False)
    queries = vectors[chosen] * 3 + 0.01 * rng.normal(size=(20, INFO.dim))  # scaled: cosine ignores length

    probs = head.probabilities(queries)

    expected = train.loc[chosen, LABELS].to_numpy(np.float32)
    prior = np.nanmean(train[LABELS].to_numpy(np.float32), axis=0)  # a neighbour whose label is unknown casts no vote
    np.testing.assert_array_equal(probs, np.where(np.isnan(expected), prior, expected).astype(np.float32))


def test_a_saved_head_reloads_with_weights_only_and_gives_identical_probabilities(store, tmp_path):
    embeddings = read_store(store)
    _, vectors = embeddings.split("test")
    fitted = {"linear": heads.fit_linear(embeddings, store, "seed", 0.999)[0], "knn": heads.fit_knn(embeddings, 5, "distance")}
    for kind, head in fitted.items():
        meta = heads.head_meta(kind, LABELS, "multi-label", INFO, store, k=5, weights="distance")
        uri = heads.save_head(str(tmp_path / "heads"), head, meta)
        # The weights file holds tensors only: torch's safe loader reads it, with no pickled object inside.
        data = (Path(uri) / checkpoint.MODEL_FILE).read_bytes()
        torch.load(io.BytesIO(data), weights_only=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
        assert b"sklearn" not in pickled and b"numpy" not in pickled

        loaded, loaded_meta = heads.load_head(uri)

        np.testing.assert_array_equal(loaded.probabilities(vectors), head.probabilities(vectors))
        assert Path(uri).name == f"{kind}-{loaded_meta['sha256'][:12]}"


def test_the_mlp_head_trains_through_ray_train_and_keeps_its_best_epoch_by_val_auroc(store, tmp_path, ray_session):
    config = job(tmp_path, store, "mlp", head={"hidden": 32}, train={"epochs": 3, "workers": 1, "cpus_per_worker": 0.5,
                                                                      "batch_size": 16, "lr": 0.01, "warmup_epochs": 0})  # fmt: skip

    result = train_head(config)

    epochs = sorted(p.name for p in (Path(config.run_dir) / "head_mlp").glob("epoch_*"))
    assert epochs == ["epoch_002", "epoch_003"]  # train.checkpoints_to_keep: 2
    head, meta = heads.load_head(result.best_checkpoint)
    assert meta["head"] == "mlp" and meta["hidden"] == 32 and meta["metrics"] == result.metrics
    best = max(json.loads((Path(config.run_dir) / "head_mlp" / e / "meta.json").read_text())["metrics"]["val_auroc_mean"] for e in epochs)
    assert result.metrics["val_auroc_mean"] == best
    assert min(test_auroc(head, store).values()) > 0.9


def test_medray_evaluate_on_a_head_run_reports_intervals_and_thresholds_chosen_on_val(store, tmp_path, ray_session):
    settings = ["--set", "model.head=linear", "--set", f"embed.output={store}", "--set", f"storage={tmp_path}",
                "--set", "name=probe", "--set", "evaluate.bootstrap=100", "--set", "evaluate.deployment_prevalence={Mass: 0.05}"]  # fmt: skip
    main(["train", *settings])
    main(["evaluate", *settings])

    out = tmp_path / "probe" / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = pd.read_parquet(out / "predictions.parquet")
    val = predictions[predictions["split"] == "val"]
    for label in LABELS:
        row = metrics["labels"][label]
        assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"] and row["auroc"] > 0.9
        assert row["threshold"] == pytest.approx(choose_threshold(val[label].to_numpy(), val[f"prob_{label}"].to_numpy()))
    assert metrics["labels"]["Mass"]["deployment_ppv"] < metrics["labels"]["Mass"]["ppv"]  # 5 % against ~40 % in test
    assert metrics["failed_images"] == 1 and metrics["calibration"]["file"].startswith(metrics["checkpoint"])
    assert set(predictions["split"]) == {"val", "test"} and {"sex", "model_sha256"} <= set(predictions)
    report = (out / "report.md").read_text()
    assert "No Grad-CAM gallery" in report and "linear head on frozen resnet18 embeddings" in report
    assert INFO.weights_sha256 in report and f"embedding store {store}" in report
    assert (out / "report.html").exists() and any(row["dimension"] == "sex" for row in metrics["subgroups"])


def test_a_store_of_other_labels_or_another_encoder_is_refused_in_one_line(store, tmp_path, capsys, ray_session):
    train_head(job(tmp_path, store, "linear"))
    others = {"labels": write_store(tmp_path / "other-labels", ["Effusion", "Edema"]),
              "encoder": write_store(tmp_path / "other-encoder", info=StoreInfo("densenet121", 16, "ef" * 32, 64))}  # fmt: skip
    for what, other in others.items():
        settings = [
            "--set",
            "model.head=linear",
            "--set",
            f"embed.output={other}",
            "--set",
            f"storage={tmp_path}",
            "--set",
            "name=linear-run",
        ]
        with pytest.raises(SystemExit) as exit_:
            main(["evaluate", *settings])
        assert exit_.value.code == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and other in line and ("Edema" if what == "labels" else "densenet121") in line


def test_an_image_model_job_given_a_head_checkpoint_is_refused_in_one_line(store, tmp_path):
    result = train_head(job(tmp_path, store, "knn"))
    with pytest.raises(checkpoint.CheckpointError, match="knn head on embeddings, not an image model"):
        checkpoint.load_model(result.best_checkpoint)


# ---- scoring: embed → head ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_run(split_manifest_path, tmp_path_factory):
    """The demo radiographs (312) embedded at 32 px by a resnet18 with random weights, saved as a user's state dict
    file — each batch through `medray embed`'s own decoding and Embedder, in this process — and a linear head on them."""
    from torchvision.models import resnet18

    from medray.data.manifest import read_manifest
    from medray.embeddings.backbones import load_encoder
    from medray.embeddings.embed import Embedder
    from medray.evaluation.predict import decode_batch

    root = tmp_path_factory.mktemp("embedded")
    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), root / "resnet18.pth")
    encoder = load_encoder("resnet18", str(root / "resnet18.pth"), image_size=32)
    embedder = Embedder("resnet18", str(root / "resnet18.pth"), encoder.in_channels, 32, {}, encoder.sha256)
    manifest = read_manifest(split_manifest_path)
    frame = manifest.frame[["image", "patient_id", "split", *manifest.labels]]
    batch = embedder(decode_batch({c: frame[c].to_numpy() for c in frame}, 32, encoder.in_channels))
    info = StoreInfo("resnet18", encoder.dim, encoder.sha256, 32)
    table = to_table(frame.assign(error=batch["error"]), batch["embedding"], manifest.labels, manifest.task, info)
    storage.write_bytes(str(root / "embeddings" / "part-00000.parquet"), part_bytes(table))
    config = build_config({"name": "probe", "storage": str(root / "runs"), "model": {"head": "linear"}, "head": {"C": 0.1},
                           "embed": {"weights": str(root / "resnet18.pth"), "output": str(root / "embeddings")},
                           "score": {"batch_size": 8, "part_size": 4, "cpus_per_actor": 0.5}})  # fmt: skip
    return config, train_head(config)


def test_scoring_with_a_head_embeds_each_image_with_its_encoder_and_gives_the_heads_probabilities(embedded_run, tmp_path, ray_session):
    from medray.jobs import score

    config, trained = embedded_run
    store = read_store(config.embeddings)
    chosen = store.frame.index[store.frame["split"] == "test"][:6]
    names = [Path(uri).name for uri in store.frame.loc[chosen, "image"]]
    folder = tmp_path / "archive"
    folder.mkdir()
    for uri, name in zip(store.frame.loc[chosen, "image"], names):
        (folder / name).write_bytes(Path(uri).read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    where = {"input": str(folder), "output": str(tmp_path / "scores")}
    head, meta = heads.load_head(trained.best_checkpoint)
    val, val_vectors = store.split("val")  # a calibration fitted on val, as `medray evaluate` leaves one in the checkpoint
    fitted, _ = calibration.fit(store.task, head.probabilities(val_vectors), val[store.labels].to_numpy(float), val["patient_id"])
    calibration.save(trained.best_checkpoint, fitted)

    summary = score(config.model_copy(update={"score": config.score.model_copy(update=where)}))

    scores = pd.read_parquet(tmp_path / "scores").set_index("image")
    assert (summary.inputs, summary.scored, summary.errors, summary.parts) == (7, 6, 1, 2)
    corrupt = scores.loc[str(folder / "corrupt.png")]
    assert corrupt["error"] != "" and corrupt.filter(like="prob_").isna().all()
    # The head on the vectors stored for these images, calibrated as the checkpoint says.
    expected = fitted.apply(head.probabilities(store.vectors[chosen]))
    got = scores.loc[[str(folder / name) for name in names], [f"prob_{label}" for label in store.labels]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert set(scores["model_sha256"]) == {meta["sha256"]} == {summary.model_sha256}
    assert summary.calibrated and scores["calibrated"].all()


def test_scoring_with_a_head_refuses_other_encoder_weights_in_one_line(embedded_run, tmp_path):
    from torchvision.models import resnet18

    from medray.jobs import score

    config, _ = embedded_run
    torch.manual_seed(1)
    torch.save(resnet18().state_dict(), tmp_path / "other.pth")
    job_config = config.model_copy(update={"embed": config.embed.model_copy(update={"weights": str(tmp_path / "other.pth")}),
                                           "score": config.score.model_copy(update={"input": str(tmp_path)})})  # fmt: skip
    with pytest.raises(heads.HeadError, match="set embed.weights to the file the store was embedded with") as error:
        score(job_config)
    assert "\n" not in str(error.value) and "other.pth" in str(error.value)


@pytest.mark.parametrize("command", ["tune", "baselines"])
def test_tune_and_baselines_which_train_image_models_refuse_a_head_on_embeddings_rather_than_ignore_it(command, store, tmp_path):
    from medray.config import ConfigError
    from medray.sweeps.baselines import run_baselines
    from medray.sweeps.tune import run_sweep

    config = job(tmp_path, store, "linear")
    with pytest.raises(ConfigError, match=rf"model.head is 'linear': `medray {command}`"):
        run_sweep(config, "tune_spaces/imbalance.yaml") if command == "tune" else run_baselines(config)
