"""Two checkpoints on the same test images: is one really better?

Each label's AUROCs are compared by DeLong's test (images as the unit) and by a paired patient
bootstrap of the difference (patients as the unit, the same resamples for both models — which is
what makes it paired). A checkpoint may be named directly or by its run directory (its best one).
"""

from __future__ import annotations

import json

import pandas as pd

from medray.config import JobConfig
from medray.data import rows
from medray.data.manifest import read_manifest
from medray.evaluation import intervals
from medray.evaluation.predict import predict
from medray.evaluation.report.document import markdown_table
from medray.io import storage
from medray.training import checkpoint


def compare(config: JobConfig, a: str, b: str, out_dir: str | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Per label: both AUROCs, DeLong's z and p, and the paired patient-bootstrap interval of A − B,
    on the test split of ``config.manifest``; written as ``compare.md`` and ``compare.json``."""
    manifest = read_manifest(config.manifest)
    labels, checkpoints = manifest.labels, {"a": checkpoint.locate(a), "b": checkpoint.locate(b)}
    test = manifest.split("test")[["image", "patient_id", *labels]]
    scored = {}
    for key, uri in checkpoints.items():
        frame = predict(rows(test), uri, config.evaluate.batch_size).to_pandas()
        scored[key] = frame.set_index("image").loc[test["image"]]  # the same row order for both models
    ok = (scored["a"]["error"] == "").to_numpy() & (scored["b"]["error"] == "").to_numpy()
    out = []
    for label in labels:
        y, pa, pb = test[label].to_numpy(float)[ok], scored["a"][f"prob_{label}"].to_numpy(float)[ok], scored["b"][f"prob_{label}"].to_numpy(float)[ok]
        patients = test["patient_id"].to_numpy()[ok]
        test_ = intervals.delong(y, pa, pb)
        boot = intervals.paired_bootstrap(y, pa, pb, patients, config.evaluate.bootstrap, config.evaluate.seed)
        out.append({"label": label, **test_, **boot})
    table = pd.DataFrame(out).set_index("label")
    out_dir = out_dir or storage.join(config.run_dir, "compare")
    paths = {"compare.md": storage.join(out_dir, "compare.md"), "compare.json": storage.join(out_dir, "compare.json")}
    text = (
        f"# A vs B on the test split ({int(ok.sum())} images, {len(set(test['patient_id'][ok]))} patients)\n\n"
        f"- A: {checkpoints['a']}\n- B: {checkpoints['b']}\n\n{markdown_table(table)}\n\n"
        "`difference` = AUROC(A) − AUROC(B); `p_value`: DeLong's two-sided test; `difference_lo/hi`: 95 % interval "
        f"from {config.evaluate.bootstrap} paired resamples of patients.\n"
    )
    storage.write_text(paths["compare.md"], text)
    storage.write_text(paths["compare.json"], json.dumps({"checkpoints": checkpoints, "labels": json.loads(table.to_json(orient="index"))}, indent=2))
    return table, paths


def baselines_uri(run_dir: str) -> str:
    """Where ``medray baselines`` (medray.sweeps.baselines) writes its comparison of a run's labels."""
    return storage.join(run_dir, "baselines", "baselines.json")


def baselines_note(images: int) -> str:
    return (f"Each label's single-task model (the run's recipe, one label) against the multi-label model on the same {images} "
            "test images: `difference` = single-task − multi-label AUROC, `p_value` by DeLong's test.")  # fmt: skip


def read_baselines(run_dir: str) -> pd.DataFrame | None:
    """The run's single-task baseline table, or None when ``medray baselines`` has not run."""
    uri = baselines_uri(run_dir)
    if not storage.exists(uri):
        return None
    return pd.DataFrame.from_dict(json.loads(storage.read_text(uri))["labels"], orient="index").rename_axis("label")
