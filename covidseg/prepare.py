"""The `prepare` stage: checked NIfTI cases -> normalised HDF5 slice stores + splits.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from covidseg.atomic import atomic_dir, write_json_atomic
from covidseg.config import PrepareParams, SplitParams
from covidseg.errors import CovidSegError
from covidseg.intensity import check_encoding, normalise
from covidseg.resample import resized_spacing, to_square
from covidseg.severity import whole_lungs
from covidseg.splits import make_split
from covidseg.store import CaseMeta, write_store
from covidseg.volumes import (
    INFECTION_ARCHIVE,
    LUNG_ARCHIVE,
    LUNG_INFECTION_ARCHIVE,
    CaseFiles,
    LoadedCase,
    find_cases,
    load_case,
)

INFECTION_LABEL = 3  # in Lung_and_Infection_Mask and in the lung_infection target


def infection_mask(masks: dict[str, np.ndarray]) -> np.ndarray:
    """{0, 1} infection from Infection_Mask, or label 3 of Lung_and_Infection_Mask."""
    if INFECTION_ARCHIVE in masks:
        return masks[INFECTION_ARCHIVE]
    return (masks[LUNG_INFECTION_ARCHIVE] == INFECTION_LABEL).astype(np.uint8)


def lung_mask(masks: dict[str, np.ndarray]) -> np.ndarray | None:
    """{0, 1 left, 2 right} whole lungs (infected parts included), if any lung labels exist."""
    if LUNG_ARCHIVE in masks:
        return masks[LUNG_ARCHIVE]
    if LUNG_INFECTION_ARCHIVE not in masks:
        return None
    return whole_lungs(masks[LUNG_INFECTION_ARCHIVE])


def target_mask(loaded: LoadedCase, target: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(training target, lungs or None) for `prepare.target`."""
    infection = infection_mask(loaded.masks)
    lungs = lung_mask(loaded.masks)
    if target == "infection":
        return infection, lungs
    if lungs is None:
        raise CovidSegError(
            f"{loaded.name}: prepare.target is lung_infection but neither {LUNG_ARCHIVE} nor "
            f"{LUNG_INFECTION_ARCHIVE} was downloaded (add it to download.sha256)"
        )
    return np.where(infection > 0, INFECTION_LABEL, lungs).astype(np.uint8), lungs


def prepare_case(files: CaseFiles, params: PrepareParams) -> tuple[dict[str, np.ndarray], CaseMeta]:
    """Load, check, normalise and resize one case; return its arrays and attributes."""
    loaded = load_case(files)
    encoding = check_encoding(loaded.image.data, files.name)
    size = params.image_size
    image = to_square(normalise(loaded.image.data, encoding, params.hu_window), size, labels=False)
    mask, lungs = target_mask(loaded, params.target)
    arrays = {"image": image.astype(params.image_dtype), "mask": to_square(mask, size, True)}
    if lungs is not None:
        arrays["lung"] = to_square(lungs, size, True)
    infected = arrays["mask"] == (1 if params.target == "infection" else INFECTION_LABEL)
    shape = loaded.image.data.shape
    meta = CaseMeta(
        case=files.name,
        encoding=encoding,
        target=params.target,
        original_shape=shape,
        original_spacing=loaded.image.spacing,
        spacing=resized_spacing(loaded.image.spacing, shape[1], shape[2], size),
        affine=loaded.image.affine.tolist(),
        hu_window=params.hu_window,
        slice_has_infection=tuple(int(v) for v in infected.any(axis=(1, 2))),
    )
    return arrays, meta


def prepare_dataset(
    params: PrepareParams,
    split: SplitParams,
    raw_dir: Path,
    out_dir: Path,
    splits_path: Path,
) -> dict[str, list[str]]:
    """Write `<case>.h5` for every case and the split; nothing is left half-written."""
    cases = find_cases(raw_dir)
    splits = make_split(split, [c.name for c in cases])  # fail before hours of work
    with atomic_dir(out_dir) as tmp:
        for files in tqdm(cases, desc="prepare", unit="case"):
            arrays, meta = prepare_case(files, params)
            write_store(tmp / f"{files.name}.h5", arrays, meta, params.compression)
    write_json_atomic(splits_path, splits)
    return splits
