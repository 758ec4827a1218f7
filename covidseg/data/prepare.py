"""The `prepare` stage: checked NIfTI cases -> normalised HDF5 slice stores + splits.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from covidseg.atomic import atomic_dir, write_json_atomic
from covidseg.config import PrepareParams, SplitParams
from covidseg.data.labels import scheme_for, target_mask
from covidseg.data.resample import resized_spacing, to_square
from covidseg.data.splits import make_splits
from covidseg.data.store import CaseMeta, write_store
from covidseg.data.transforms import model_input, recipe_of
from covidseg.data.volumes import CaseFiles, find_cases, load_case


def prepare_case(files: CaseFiles, params: PrepareParams) -> tuple[dict[str, np.ndarray], CaseMeta]:
    """Load, check, normalise and resize one case; return its arrays and attributes."""
    loaded = load_case(files)
    scheme = scheme_for(params.target)
    size = params.image_size
    prepared = model_input(loaded.image, files.name, recipe_of(params))
    mask, lungs = target_mask(loaded.masks, scheme, files.name)
    arrays = {"image": prepared.image, "mask": to_square(mask, size, True)}
    if lungs is not None:
        arrays["lung"] = to_square(lungs, size, True)
    infected = arrays["mask"] == scheme.infection
    shape = loaded.image.data.shape
    meta = CaseMeta(
        case=files.name,
        encoding=prepared.encoding,
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
    *,
    raw_dir: Path,
    out_dir: Path,
    splits_path: Path,
) -> dict[str, dict[str, list[str]]]:
    """Write `<case>.h5` for every case and every fold's split; nothing is left half-written."""
    cases = find_cases(raw_dir)
    splits = make_splits(split, [c.name for c in cases])  # fail before hours of work
    with atomic_dir(out_dir) as tmp:
        for files in tqdm(cases, desc="prepare", unit="case"):
            arrays, meta = prepare_case(files, params)
            write_store(tmp / f"{files.name}.h5", arrays, meta, params.compression)
    write_json_atomic(splits_path, splits)
    return splits
