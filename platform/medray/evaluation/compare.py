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
