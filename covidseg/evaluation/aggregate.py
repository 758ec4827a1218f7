"""The `aggregate` stage: the experiment's headline over every fold, out of fold, per case.

Each `evaluate@<k>` scored its fold's test cases; this stage puts the folds together the way the
benchmark and nnU-Net report cross-validation: means and standard deviations over all per-case
out-of-fold results (`metrics/evaluate.json`, which `dvc metrics diff` and `dvc exp show`
compare), one row per (fold, case) (`metrics/per_case.csv`), per-fold means
(`metrics/per_fold.csv`, drawn by `dvc plots`), and the Task-1 style table beside the published
numbers (`reports/benchmark.md` and `.png`). The ensemble of the fold models is logged to the
cross-validation's MLflow parent run and registered, with its headline and test cases as
evidence; it becomes `tracking.alias` only as `tracking.promote` says (by default: when it beats
the current one on the same test cases). A cross-validation with a fold whose validation
diverged is never registered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypedDict, get_args

import numpy as np

from covidseg.atomic import atomic_dir, write_json_atomic, write_text_atomic
from covidseg.config import Params, PromoteMetric
from covidseg.errors import CovidSegError
from covidseg.evaluation.metrics import METRIC_KEYS, Summary, summarise
from covidseg.inference.ensemble import load_ensemble
from covidseg.reporting.figures import benchmark_figure
from covidseg.tracking import Evidence, Tracker

log = logging.getLogger(__name__)

HEADLINE = ("dice", "nsd", "hd95")
COLUMN_NAMES = {
    "dice": "infection DSC",
    "nsd": "infection NSD",
    "left_lung_dice": "left lung DSC",
    "left_lung_nsd": "left lung NSD",
    "right_lung_dice": "right lung DSC",
    "right_lung_nsd": "right lung NSD",
}
LUNG_KEYS = ("left_lung_dice", "left_lung_nsd", "right_lung_dice", "right_lung_nsd")
CAVEATS = (
    "Per-case 3D Dice and NSD (3 mm for infection, 1 mm for lungs), mean ± population std over "
    "the test cases of each fold; Avg is over every test case of every fold.",
    "Published numbers are the benchmark's 3D U-Net baselines (Task 1 README): another "
    "architecture, trained on the full 3D volumes. They are comparable only on the same "
    "protocol (`split.scheme: benchmark`, the same `split.protocol`) and with "
    "`split.val_fraction: 0`, so that each fold trains on exactly the authors' training cases.",
    "NSD here counts boundary voxels (MONAI's default); the benchmark's code weights surface "
    "elements by area, so NSD can differ slightly.",
)


@dataclass(frozen=True)
class AggregatePaths:
    folds_dir: Path  # metrics/folds: <k>/per_case.csv from each evaluate@<k>
    models_dir: Path  # models: fold-<k>/ from each train@<k> (logged as the ensemble)
    metrics: Path  # metrics/evaluate.json
    per_case: Path  # metrics/per_case.csv
    per_fold: Path  # metrics/per_fold.csv
    report_dir: Path  # reports/benchmark: benchmark.md and benchmark.png


@dataclass(frozen=True)
class ScoredCase:
    """One test case of one fold as its `evaluate@<k>` wrote it in `per_case.csv`: the metric
    columns in the file's order, numbers parsed (empty cells: NaN)."""

    case: str
    fold: int
    metrics: dict[str, float]

    def row(self) -> dict[str, str | int | float]:
        """Its row of the experiment's `per_case.csv`."""
        return {"case": self.case, "fold": self.fold, **self.metrics}


@dataclass(frozen=True)
class CrossValidation:
    """The folds put together: `summarise` over every out-of-fold case, and over each fold's."""

    keys: tuple[str, ...]  # the metric columns, the headline first (`metric_keys`)
    overall: Summary  # every case: "n_cases", each key's mean, "<key>_std" and "<key>_n"
    folds: dict[str, Summary]  # by fold number: "n_cases", each key's mean and "<key>_std"

    def to_json(self) -> dict[str, object]:
        """Headline means and stds at the top; counts and per-fold means nested below them."""
        out: dict[str, object] = {"n_cases": self.overall["n_cases"]}
        for key in self.keys:
            out[key], out[f"{key}_std"] = self.overall[key], self.overall[f"{key}_std"]
        out["counts"] = {key: self.overall[f"{key}_n"] for key in self.keys}
        out["folds"] = self.folds
        return out


class PublishedScores(TypedDict):
    """The benchmark's [mean, std] of each metric, for one fold or over all of them."""

    dice: list[float]
    nsd: list[float]


class Published(TypedDict):
    """One protocol's entry of `resources/published_task1.json`."""

    folds: dict[str, PublishedScores]
    avg: PublishedScores
    lung_infection: dict[str, float]  # the lung + infection model's means over all folds


def read_fold_rows(folds_dir: Path, fold: int) -> list[ScoredCase]:
    """One fold's per-case rows, numbers parsed (empty cells: NaN), with the fold number."""
    path = folds_dir / str(fold) / "per_case.csv"
    if not path.is_file():
        raise CovidSegError(f"{path}: missing; run evaluate for fold {fold} (dvc repro)")
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            case = row.pop("case")
            metrics = {k: float(v) if v else math.nan for k, v in row.items() if k != "fold"}
            rows.append(ScoredCase(case, fold, metrics))
    return rows


def metric_keys(rows: Sequence[ScoredCase]) -> tuple[str, ...]:
    """The metric columns present, in a stable order (the headline first)."""
    present = list(rows[0].metrics)
    ordered = [k for k in METRIC_KEYS if k in present]
    return tuple(ordered + [k for k in present if k not in ordered])


def summary_of(rows: list[ScoredCase], folds: list[int]) -> CrossValidation:
    """Means, stds and counts over every case, and each fold's means and stds."""
    keys = metric_keys(rows)
    overall = summarise([r.metrics for r in rows], keys)
    per_fold: dict[str, Summary] = {}
    for fold in folds:
        mine = summarise([r.metrics for r in rows if r.fold == fold], keys)
        per_fold[str(fold)] = {"n_cases": mine["n_cases"]} | {
            k: mine[k] for key in keys for k in (key, f"{key}_std")
        }
    return CrossValidation(keys, overall, per_fold)


def metrics_file(summary: CrossValidation) -> dict[str, object]:
    """What `metrics/evaluate.json` holds: every mean and std, the counts, and each fold's
    headline means only (stds and the rest are in `per_fold.csv` and the report), so that
    `dvc metrics diff` stays one screen."""
    folds = {k: {m: v[m] for m in HEADLINE if m in v} for k, v in summary.folds.items()}
    return {**summary.to_json(), "folds": folds}


def csv_text(rows: Sequence[Mapping[str, object]], columns: list[str]) -> str:
    """CSV with NaN and None as empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _missing(row.get(k)) else row.get(k) for k in columns})
    return buffer.getvalue()


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def published(params: Params) -> Published | None:
    """The benchmark's per-fold numbers for this protocol, or None when not comparable."""
    if params.split.scheme != "benchmark":
        return None
    text = (resources.files("covidseg") / "resources" / "published_task1.json").read_text()
    table: Published = json.loads(text)[params.split.protocol]  # the package's own file
    return table


def _pm(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{mean:.4f} ± {std or 0:.4f}"


def benchmark_table(summary: CrossValidation, params: Params, multi: bool) -> str:
    """The Task-1 style markdown table, this run beside the published numbers."""
    ref = published(params)
    keys = ["dice", "nsd", *(LUNG_KEYS if multi else ())]
    head = ["fold", *(COLUMN_NAMES[k] for k in keys)]
    if ref:
        head += ["DSC (published)", "NSD (published)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fold_refs = ref.get("folds", {}) if ref else {}
    rows = [(f"Fold{k}", v, fold_refs.get(k)) for k, v in summary.folds.items()]
    rows.append(("Avg", summary.overall, ref.get("avg") if ref else None))
    for name, values, pub in rows:
        cells = [name, *(_pm(values.get(k), values.get(f"{k}_std")) for k in keys)]
        if ref:
            cells += [_pm(*pub["dice"]) if pub else "n/a", _pm(*pub["nsd"]) if pub else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fold_size_note(summary: CrossValidation, params: Params) -> str:
    """The caveat on single-fold numbers, with this run's test cases per fold."""
    counts = sorted({int(fold["n_cases"] or 0) for fold in summary.folds.values()})
    sizes = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    one = counts == [1]
    note = f"{sizes} test {'case' if one else 'cases'} per fold {'makes' if one else 'make'}"
    note += " single-fold numbers noisy"
    if params.split.scheme == "benchmark" and params.split.protocol == "16_4":
        note += " (published fold 4: 0.66 ± 0.42 from one near-failed case)"
    return note + ": compare experiments on Avg."


def benchmark_report(summary: CrossValidation, params: Params, multi: bool) -> str:
    """`reports/benchmark/benchmark.md`: the table, the setting and the caveats."""
    sp = params.split
    protocol = f"{sp.scheme}" + (f", protocol {sp.protocol}" if sp.scheme == "benchmark" else "")
    if sp.scheme == "kfold":
        protocol += f", {sp.n_folds} folds (seed {sp.seed})"
    n_cases = summary.overall["n_cases"]
    intro = (
        f"# Cross-validation: {params.arch} / {params.encoder}, {params.prepare.image_size} px\n\n"
        f"Split: {protocol}; folds {list(sp.folds)}; {n_cases} test cases in all "
        f"(validation share {sp.val_fraction}).\n\n"
    )
    notes = "\n".join(f"- {c}" for c in (*CAVEATS, fold_size_note(summary, params)))
    if published(params) is None:
        notes += "\n- No published numbers for this split: only `split.scheme: benchmark` has them."
    return intro + benchmark_table(summary, params, multi) + "\n\nNotes:\n" + notes + "\n"


def aggregate(params: Params, paths: AggregatePaths) -> CrossValidation:
    """Put the folds together; write the headline, tables and figure; log the ensemble."""
    folds = list(params.split.folds)
    rows = [row for fold in folds for row in read_fold_rows(paths.folds_dir, fold)]
    if not rows:
        raise CovidSegError(f"{paths.folds_dir}: the folds {folds} have no test cases")
    summary = summary_of(rows, folds)
    multi = "left_lung_dice" in rows[0].metrics
    columns = ["case", "fold", *metric_keys(rows)]
    per_fold = [{"fold": k, **v} for k, v in summary.folds.items()]
    with atomic_dir(paths.report_dir) as tmp:
        (tmp / "benchmark.md").write_text(benchmark_report(summary, params, multi))
        benchmark_figure(summary.folds, published(params), tmp / "benchmark.png")
    write_text_atomic(paths.per_case, csv_text([row.row() for row in rows], columns))
    fold_columns = ["fold", "n_cases", *(k for key in HEADLINE for k in (key, f"{key}_std"))]
    write_text_atomic(paths.per_fold, csv_text(per_fold, fold_columns))
    write_json_atomic(paths.metrics, metrics_file(summary))
    track(params, paths, summary, rows)
    return summary


def evidence_of(params: Params, rows: Sequence[ScoredCase], summary: CrossValidation) -> Evidence:
    """What the registered ensemble is judged by: its means, the split and the cases scored."""
    sp = params.split
    split = f"benchmark {sp.protocol}"
    if sp.scheme == "kfold":
        split = f"kfold, {sp.n_folds} folds, seed {sp.seed}"
    pairs = sorted([row.fold, row.case] for row in rows)
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    scores = {}
    for key in get_args(PromoteMetric):
        value = summary.overall.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            scores[key] = float(value)
    return Evidence(scores=scores, split=split, cases=digest, n_cases=len(rows))


def read_epoch_log(path: Path) -> list[dict[str, float]]:
    """A fold's per-epoch training log (`metrics/folds/logs/fold-<k>.csv`), numbers parsed;
    empty cells are left out."""
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def divergence(rows: list[dict[str, float]], factor: float | None) -> str | None:
    """How a fold's validation shows divergence, or None: a non-finite loss or Dice, a loss
    over `train.max_loss_factor` times the lowest before it, or Dice 0 on every validation case
    at every epoch (no epoch found any lesion)."""
    lowest = math.inf
    for row in rows:
        epoch = int(row.get("epoch", 0))
        for key in ("val_loss", "val_dice"):
            if key in row and not math.isfinite(row[key]):
                return f"{key} is {row[key]} at epoch {epoch}"
        loss = row.get("val_loss")
        if loss is not None and factor is not None and loss > factor * lowest:
            return (
                f"val_loss {loss:.4g} at epoch {epoch} is over train.max_loss_factor={factor:g} "
                f"times the lowest before it ({lowest:.4g})"
            )
        lowest = min(lowest, loss if loss is not None else math.inf)
    dices = [row["val_dice"] for row in rows if "val_dice" in row]
    if dices and max(dices) == 0:
        return "validation Dice 0 on every validation case at every epoch"
    return None


def diverged_fold(params: Params, folds_dir: Path) -> str | None:
    """The first fold whose training log shows divergence, and how; None when none does."""
    for fold in params.split.folds:
        path = folds_dir / "logs" / f"fold-{fold}.csv"
        if not path.is_file():
            return f"fold {fold} has no training log ({path}) to show that it did not diverge"
        if reason := divergence(read_epoch_log(path), params.train.max_loss_factor):
            return f"fold {fold} diverged ({reason})"
    return None


def track(
    params: Params, paths: AggregatePaths, summary: CrossValidation, rows: Sequence[ScoredCase]
) -> None:
    """The parent run: headline metrics, the report, and the fold ensemble, registered unless
    a fold diverged (see `Tracker.register` for when it becomes `tracking.alias`)."""
    import torch

    with Tracker.start_parent(params) as tracker:  # FAILED or KILLED if this stage stops
        headline = summary.to_json().items()
        flat: dict[str, float | None] = {k: v for k, v in headline if isinstance(v, int | float)}
        flat |= {f"fold{k}.{m}": v[m] for k, v in summary.folds.items() for m in HEADLINE if m in v}
        tracker.log_metrics(flat)
        for path, folder in (
            (paths.metrics, "evaluation"),
            (paths.per_case, "evaluation"),
            (paths.report_dir, "evaluation"),
            (Path("params.yaml"), None),
        ):
            if path.exists():
                tracker.log_artifact(path, folder)
        if reason := diverged_fold(params, paths.folds_dir):
            log.warning(
                "the ensemble is not registered: %s; %s stays where it was",
                reason,
                params.tracking.alias,
            )
            tracker.tag({"covidseg.diverged": reason})
            return
        if tracker.active:
            ensemble, spec = load_ensemble(
                paths.models_dir, torch.device("cpu"), list(params.split.folds)
            )
            example = np.zeros((1, 1, spec.image_size, spec.image_size), dtype=np.float32)
            tracker.register(
                ensemble,
                example,
                metadata=spec.to_json(),
                evidence=evidence_of(params, rows, summary),
                tracking=params.tracking,
            )
