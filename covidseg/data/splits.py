"""Patient-level train / validation / test splits.

Two radiopaedia cases can come from one patient (same Radiopaedia case number), so every split
of our own groups cases by patient. Validation cases come from the training cases only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np

from covidseg.config import SplitParams
from covidseg.errors import CovidSegError

BENCHMARK_KEYS = {"16_4": "folds_16train_4test", "4_16": "folds_4train_16test"}
_RADIOPAEDIA = re.compile(r"^(radiopaedia_\d+)_")


def patient_of(case: str) -> str:
    """`radiopaedia_29_86490_1` -> `radiopaedia_29`; any other case is its own patient."""
    match = _RADIOPAEDIA.match(case)
    return match.group(1) if match else case


Patients = Mapping[str, str]  # case -> patient (a folder dataset's patients.csv)


def group_by_patient(cases: list[str], patients: Patients | None = None) -> dict[str, list[str]]:
    """Patient id -> its cases, both sorted; `patients` where given, else `patient_of`."""
    groups: dict[str, list[str]] = {}
    for case in sorted(cases):
        patient = patients[case] if patients is not None else patient_of(case)
        groups.setdefault(patient, []).append(case)
    return groups


def benchmark_fold(protocol: str, fold: int) -> dict[str, list[str]]:
    """The dataset authors' fold: {"train": [...], "test": [...]}."""
    text = resources.files("covidseg") / "resources" / "benchmark_task1_splits.json"
    folds = json.loads(text.read_text())[BENCHMARK_KEYS[protocol]]
    return {"train": sorted(folds[fold]["train"]), "test": sorted(folds[fold]["test"])}


def kfold_test_cases(
    cases: list[str], n_folds: int, fold: int, seed: int, *, patients: Patients | None = None
) -> list[str]:
    """Seeded patient-grouped k-fold: the test cases of `fold`."""
    groups = group_by_patient(cases, patients)
    if n_folds > len(groups):
        raise CovidSegError(
            f"split.n_folds={n_folds} but only {len(groups)} patients are present "
            f"({len(cases)} cases)"
        )
    order = np.random.default_rng(seed).permutation(sorted(groups))
    chosen = [p for i, p in enumerate(order) if i % n_folds == fold]
    return sorted(case for patient in chosen for case in groups[patient])


def hold_out_validation(
    train: list[str], fraction: float, seed: int, *, patients: Patients | None = None
) -> tuple[list[str], list[str]]:
    """Split training cases into (train, val) by patient; at least one patient keeps training."""
    groups = group_by_patient(train, patients)
    n_val = round(fraction * len(groups)) if fraction > 0 else 0
    n_val = min(max(n_val, 1 if fraction > 0 else 0), len(groups) - 1)
    order = list(np.random.default_rng(seed + 1).permutation(sorted(groups)))
    val_patients = set(order[:n_val])
    val = sorted(c for p in val_patients for c in groups[p])
    return sorted(c for c in train if c not in val), val


def make_split(
    params: SplitParams, cases: list[str], fold: int, *, patients: Patients | None = None
) -> dict[str, list[str]]:
    """`{"train", "val", "test"}` case lists of one fold of the selected scheme; `patients`
    groups the cases (default: `patient_of`)."""
    present = set(cases)
    if params.scheme == "benchmark":
        chosen = benchmark_fold(params.protocol, fold)
        absent = sorted(c for c in chosen["train"] + chosen["test"] if c not in present)
        if absent:
            raise CovidSegError(
                f"the benchmark split ({params.protocol}, fold {fold}) names "
                f"{len(absent)} cases that are not in the data: {', '.join(absent)}; "
                "download all archives or set split.scheme: kfold to split the cases present"
            )
        test, train = chosen["test"], chosen["train"]
    else:
        test = kfold_test_cases(
            sorted(present), params.n_folds, fold, params.seed, patients=patients
        )
        train = sorted(present - set(test))
    if not train:
        raise CovidSegError("the split leaves no training case")
    train, val = hold_out_validation(train, params.val_fraction, params.seed, patients=patients)
    return {"train": train, "val": val, "test": sorted(test)}


def make_splits(
    params: SplitParams, cases: list[str], *, patients: Patients | None = None
) -> dict[str, dict[str, list[str]]]:
    """Every fold of the scheme, `{"0": {"train", "val", "test"}, ...}`: what `prepare` writes.

    All folds, not only `split.folds`, so that choosing other folds changes no file that a
    finished fold depends on.
    """
    return {
        str(k): make_split(params, cases, k, patients=patients) for k in range(params.fold_count)
    }


def load_splits(path: Path, fold: int) -> dict[str, list[str]]:
    """One fold of `splits.json`; it must name training cases."""
    try:
        folds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CovidSegError(f"{path}: cannot read the split ({error})") from None
    if not isinstance(folds, dict) or str(fold) not in folds:
        raise CovidSegError(f"{path}: no fold {fold}; rerun prepare (dvc repro prepare)")
    split: dict[str, list[str]] = folds[str(fold)]  # as `prepare` wrote it (`make_splits`)
    if not split.get("train"):
        raise CovidSegError(f"{path}: fold {fold} has no training cases")
    return split
