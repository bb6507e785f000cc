"""``medray drift RUN_A RUN_B``: what moved between two scoring runs of one model, without labels.

RUN_A is the reference (e.g. last month's archive, or the scoring of the test split at release), RUN_B the
run to check. Each is a score output folder; its ``_summary.json`` holds the statistics of
``medray.scoring.statistics``, so no image is read again. Compared:

- per label, the score distribution: the **population stability index** (PSI) and the two-sample
  **Kolmogorov–Smirnov statistic** (KS), and the share at or above the operating threshold;
- the inputs: mean intensity (change of mean, PSI, KS), stored width and height (relative change of the
  mean), bit depth / modality / view / site (change of each category's share; a category RUN_A never had);
- the share of inputs that could not be scored.

Where the numbers come from. PSI is defined on bins, and is always computed from the summaries' fixed-bin
histograms: the 50 probability bins (64 intensity bins) are merged into about ten groups of equal RUN_A
mass (RUN_A's deciles, as far as the fine bins allow), so it comes out the same whether or not the rows are
still there, and stays comparable with the usual 0.1 / 0.2 / 0.25 rules of thumb, which assume ~10 bins.
KS and the share above threshold use the rows (the parts' Parquet columns) when both runs have them: exact,
by ``scipy.stats.ks_2samp``. Without rows they fall back to the histograms: the largest gap between the
cumulative shares at the bin edges (a lower bound of the exact KS, short of it by at most one bin's mass)
and the share recorded at scoring time (or, for another threshold, the share of bins from the threshold up).

A run whose summary predates these statistics is summarised from its parts here (without the input facts
it never recorded). Runs of different models (``model_sha256``) are refused: their scores differ by design.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from medray.config import DriftConfig
from medray.errors import MedrayError
from medray.io import storage
from medray.scoring import statistics

log = logging.getLogger(__name__)
SUMMARY = "_summary.json"  # medray.scoring.score.SUMMARY; not imported, to keep Ray and torch out of `medray drift`
PSI_GROUPS = 10
PSI_FLOOR = 1e-4  # share given to an empty group, so that ln(b / a) stays finite (the usual PSI convention)


class DriftError(MedrayError, ValueError):
    """Two runs that cannot be compared as asked (not a score output, different models): one line."""


@dataclass
class Check:
    """One compared quantity: its value in each run, the shift between them and the limit it is held to."""

    item: str  # "score Mass", "input mean_intensity", "modality CR", "errors"
    measure: str  # psi, ks, positive_rate, mean_change, relative_mean_change, share_change, new_category, error_rate
    a: float | None
    b: float | None
    shift: float | None
    limit: float | None
    flagged: bool = False
    source: str = ""  # rows, summary


@dataclass
class Drift:
    run_a: str
    run_b: str
    model_sha256: tuple[str, str]
    rows: tuple[int, int]
    checks: list[Check]
    histograms: dict[str, tuple[list, list]] = field(default_factory=dict)  # per label, A's and B's probability bins: the plot
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def flagged(self) -> list[Check]:
        return [c for c in self.checks if c.flagged]


# --- the measures ------------------------------------------------------------------------------------


def psi(expected, actual, floor: float = PSI_FLOOR) -> float:
    """Population stability index of two binned distributions (counts or shares, same bins):
    Σ (b − a) · ln(b / a) over the bins' shares, each share at least ``floor``."""
    a, b = np.asarray(expected, dtype=float), np.asarray(actual, dtype=float)
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    a, b = np.maximum(a / a.sum(), floor), np.maximum(b / b.sum(), floor)
    return float(np.sum((b - a) * np.log(b / a)))


def reference_groups(counts, groups: int = PSI_GROUPS) -> list[int]:
    """Where to cut fine bins into at most ``groups`` groups of about equal reference mass: the indices
    (into ``counts``) at which each group ends. A bin heavier than a group stays one group."""
    counts = np.asarray(counts, dtype=float)
    cumulative = np.cumsum(counts) / counts.sum()
    ends, target = [], 1.0 / groups
    for i, share in enumerate(cumulative[:-1]):
        if share >= target - 1e-12:
            ends.append(i + 1)
            target = (np.floor(share * groups + 1e-9) + 1) / groups
    return [*ends, len(counts)]


def binned_psi(reference, current, groups: int = PSI_GROUPS) -> float:
    """PSI over groups of the fine bins holding about equal shares of ``reference`` (its deciles)."""
    reference, current = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if reference.sum() <= 0 or current.sum() <= 0:
        return float("nan")
    starts = [0, *reference_groups(reference, groups)[:-1]]
    return psi(np.add.reduceat(reference, starts), np.add.reduceat(current, starts))


def histogram_ks(a, b) -> float:
    """The largest gap between two histograms' cumulative shares (at the bin edges): a lower bound of KS."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    return float(np.max(np.abs(np.cumsum(a) / a.sum() - np.cumsum(b) / b.sum())))


def rows_ks(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).statistic) if len(a) and len(b) else float("nan")


def _histogram_mean(counts, edges: np.ndarray) -> float | None:
    counts = np.asarray(counts, dtype=float)
    return float(np.dot(counts, (edges[:-1] + edges[1:]) / 2) / counts.sum()) if counts.sum() else None


# --- one run -----------------------------------------------------------------------------------------


@dataclass
class _Run:
    folder: str
    summary: dict
    stats: dict
    rows: object = None  # pandas frame of the good rows' probabilities and mean intensity, when the parts are there


def _load(folder: str, config: DriftConfig, use_rows: bool) -> _Run:
    folder = storage.absolute(folder)
    path = storage.join(folder, SUMMARY)
    if not storage.exists(path):
        raise DriftError(f"{folder}: no {SUMMARY} — not a finished score output (run `medray score` into it first)")
    summary = json.loads(storage.read_text(path))
    stats = summary.get("statistics") or {}
    if not stats:
        log.info("%s: scored before summaries kept statistics; summarising its parts", folder)
        stats = statistics.summarise(folder, config.thresholds, config.threshold)
    run = _Run(folder, summary, stats)
    if use_rows:
        labels = [f"prob_{label}" for label in stats.get("labels", {})]
        frame = statistics.read_rows(folder, ["error", "mean_intensity", *labels])
        if len(frame) and "error" in frame and all(c in frame for c in labels):
            run.rows = frame[frame["error"].fillna("").astype(str) == ""]
    return run


def _values(run: _Run, column: str) -> np.ndarray | None:
    if run.rows is None or column not in run.rows:
        return None
    values = run.rows[column].to_numpy(dtype=float)
    return values[np.isfinite(values)]


# --- comparing ---------------------------------------------------------------------------------------


def _label_checks(label: str, a: _Run, b: _Run, config: DriftConfig) -> list[Check]:
    sa, sb = a.stats["labels"][label], b.stats["labels"][label]
    edges = statistics.probability_edges()
    pa, pb = _values(a, f"prob_{label}"), _values(b, f"prob_{label}")
    rows = pa is not None and pb is not None
    source = "rows" if rows else "summary"
    mean_a = float(pa.mean()) if rows and len(pa) else _histogram_mean(sa["histogram"], edges)
    mean_b = float(pb.mean()) if rows and len(pb) else _histogram_mean(sb["histogram"], edges)
    item = f"score {label}"
    checks = [
        Check(item, "psi", mean_a, mean_b, binned_psi(sa["histogram"], sb["histogram"]), config.psi, source="summary"),
        Check(
            item,
            "ks",
            mean_a,
            mean_b,
            rows_ks(pa, pb) if rows else histogram_ks(sa["histogram"], sb["histogram"]),
            config.ks,
            source=source,
        ),
    ]
    # The operating threshold run A was scored with (the model's, see scoring.thresholds) unless one is set here.
    cut = config.thresholds.get(label, sa.get("threshold", config.threshold))
    share_a, share_b = (_share_above(run, values, label, cut) for run, values in ((a, pa), (b, pb)))
    if share_a is not None and share_b is not None:
        checks.append(Check(item, "positive_rate", share_a, share_b, abs(share_b - share_a), config.positive_rate, source=source))
    return checks


def _share_above(run: _Run, values: np.ndarray | None, label: str, cut: float) -> float | None:
    if values is not None:
        return float((values >= cut).mean()) if len(values) else None
    entry = run.stats["labels"][label]
    if entry.get("above_threshold") is not None and np.isclose(entry["threshold"], cut):
        return entry["above_threshold"]
    counts = np.asarray(entry["histogram"], dtype=float)
    first = int(np.searchsorted(statistics.probability_edges(), cut, side="left"))  # bins from the threshold up
    return float(counts[min(first, len(counts)) :].sum() / counts.sum()) if counts.sum() else None


def _input_checks(a: _Run, b: _Run, config: DriftConfig) -> list[Check]:
    checks = []
    na, nb = a.stats.get("numeric", {}), b.stats.get("numeric", {})
    ia, ib = na.get("mean_intensity", {}), nb.get("mean_intensity", {})
    if ia.get("n") and ib.get("n"):
        item = "input mean_intensity"
        checks.append(
            Check(item, "mean_change", ia["mean"], ib["mean"], abs(ib["mean"] - ia["mean"]), config.mean_intensity, source="summary")
        )
        checks.append(
            Check(item, "psi", ia["mean"], ib["mean"], binned_psi(ia["histogram"], ib["histogram"]), config.psi, source="summary")
        )
        va, vb = _values(a, "mean_intensity"), _values(b, "mean_intensity")
        rows = va is not None and vb is not None and len(va) and len(vb)
        ks = rows_ks(va, vb) if rows else histogram_ks(ia["histogram"], ib["histogram"])
        checks.append(Check(item, "ks", ia["mean"], ib["mean"], ks, config.ks, source="rows" if rows else "summary"))
    for name in ("width", "height"):
        sa, sb = na.get(name, {}), nb.get(name, {})
        if sa.get("n") and sb.get("n"):
            change = abs(sb["mean"] / sa["mean"] - 1) if sa["mean"] else float("inf")
            checks.append(
                Check(f"input {name}", "relative_mean_change", sa["mean"], sb["mean"], change, config.image_size, source="summary")
            )
    ca, cb = a.stats.get("categorical", {}), b.stats.get("categorical", {})
    for name in statistics.CATEGORICAL:
        counts_a, counts_b = ca.get(name, {}), cb.get(name, {})
        total_a, total_b = sum(counts_a.values()), sum(counts_b.values())
        if not total_a or not total_b:
            continue
        for category in sorted(set(counts_a) | set(counts_b)):
            share_a, share_b = counts_a.get(category, 0) / total_a, counts_b.get(category, 0) / total_b
            item = f"{name} {category}"
            if category not in counts_a:
                checks.append(Check(item, "new_category", 0.0, share_b, share_b, config.new_category, source="summary"))
            else:
                checks.append(
                    Check(item, "share_change", share_a, share_b, abs(share_b - share_a), config.category_share, source="summary")
                )
    return checks


def _flag(check: Check) -> Check:
    if check.shift is None or check.limit is None or np.isnan(check.shift):
        return check
    # A category RUN_A never had is flagged from its limit up; every other shift when it exceeds its limit.
    check.flagged = bool(check.shift >= check.limit if check.measure == "new_category" else check.shift > check.limit)
    return check


def compare(run_a: str, run_b: str, config: DriftConfig, allow_different_models: bool = False, use_rows: bool = True) -> Drift:
    """The checks between two score outputs (see the module's docstring), each flagged against ``config``'s limits."""
    a, b = _load(run_a, config, use_rows), _load(run_b, config, use_rows)
    models = (a.summary.get("model_sha256", ""), b.summary.get("model_sha256", ""))
    if models[0] != models[1] and not allow_different_models:
        raise DriftError(
            f"{b.folder} was scored by another model ({models[1][:12]}…) than {a.folder} ({models[0][:12]}…): "
            "compare runs of one model, or pass --allow-different-models"
        )
    labels = [label for label in a.stats.get("labels", {}) if label in b.stats.get("labels", {})]
    if not labels:
        raise DriftError(f"{a.folder} and {b.folder} share no label to compare")
    checks = [c for label in labels for c in _label_checks(label, a, b, config)]
    checks.append(
        Check(
            "errors",
            "error_rate",
            a.stats["error_rate"],
            b.stats["error_rate"],
            abs(b.stats["error_rate"] - a.stats["error_rate"]),
            config.error_rate,
            source="summary",
        )
    )
    checks += _input_checks(a, b, config)
    histograms = {label: (a.stats["labels"][label]["histogram"], b.stats["labels"][label]["histogram"]) for label in labels}
    return Drift(a.folder, b.folder, models, (a.stats["rows"], b.stats["rows"]), [_flag(c) for c in checks], histograms)


def drift(run_a: str, run_b: str, config: DriftConfig, out: str | None = None, allow_different_models: bool = False) -> Drift:
    """``compare``, then ``drift.json``, ``drift.md`` and ``drift.png`` in ``out`` (default ``<RUN_B>/_drift``)."""
    result = compare(run_a, run_b, config, allow_different_models)
    result.paths = write_report(result, storage.absolute(out) if out else storage.join(result.run_b, "_drift"))
    return result


def as_json(result: Drift) -> str:
    def clean(value):
        return None if isinstance(value, float) and not np.isfinite(value) else value

    checks = [{k: clean(v) for k, v in asdict(c).items()} for c in result.checks]
    body = {
        "run_a": result.run_a,
        "run_b": result.run_b,
        "model_sha256": list(result.model_sha256),
        "rows": list(result.rows),
        "flagged": sum(c["flagged"] for c in checks),
        "checks": checks,
    }
    return json.dumps(body, indent=2)


def describe(check: Check) -> str:
    """One line: what moved, by how much, against which limit."""
    return (
        f"{check.item}: {check.measure} {_number(check.shift)} (limit {_number(check.limit)}; A {_number(check.a)}, B {_number(check.b)})"
    )


# --- the report --------------------------------------------------------------------------------------


def _number(value) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.4g}"


def as_markdown(result: Drift) -> str:
    flagged = result.flagged
    lines = [
        "# Drift between two scoring runs",
        "",
        f"- A (reference): `{result.run_a}` — {result.rows[0]} inputs",
        f"- B: `{result.run_b}` — {result.rows[1]} inputs",
        f"- model: `{result.model_sha256[1][:12]}`"
        + ("" if result.model_sha256[0] == result.model_sha256[1] else f" (A: `{result.model_sha256[0][:12]}`, a different model)"),
        f"- **{len(flagged)} of {len(result.checks)} checks exceed their limits**",
        "",
        "A and B: the mean (scores, intensity, size) or share (positive rate, errors, categories) in each run; shift: the "
        "measure between them (PSI, KS, or the absolute/relative change); source: rows (the Parquet parts) or summary "
        "(the histograms of `_summary.json`).",
        "",
        "| item | measure | A | B | shift | limit | source | flagged |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for c in sorted(result.checks, key=lambda c: not c.flagged):
        lines.append(
            f"| {c.item} | {c.measure} | {_number(c.a)} | {_number(c.b)} | {_number(c.shift)} | {_number(c.limit)} | "
            f"{c.source} | {'**yes**' if c.flagged else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: Drift) -> bytes:
    """Per label, the share of inputs in each probability bin, A against B."""
    from medray.io.figures import plt, png

    labels = list(result.histograms)
    columns = min(len(labels), 4)
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    edges = statistics.probability_edges()
    for ax, label in zip(axes.flat, labels):
        for counts, name, colour in zip(result.histograms[label], ("A", "B"), ("tab:blue", "tab:orange")):
            counts = np.asarray(counts, dtype=float)
            ax.stairs(counts / max(counts.sum(), 1), edges, label=name, color=colour, fill=name == "A", alpha=0.5 if name == "A" else 1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("probability", fontsize=8)
    for ax in list(axes.flat)[len(labels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("share of inputs", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("score distributions: A (reference) vs B", fontsize=10)
    return png(fig)


def write_report(result: Drift, out: str) -> dict[str, str]:
    paths = {name: storage.join(out, name) for name in ("drift.json", "drift.md", "drift.png")}
    storage.write_text(paths["drift.json"], as_json(result))
    storage.write_text(paths["drift.md"], as_markdown(result))
    storage.write_bytes(paths["drift.png"], plot(result))
    return paths
