"""The `prepare` stage: checked NIfTI cases -> normalised HDF5 slice stores + splits.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidseg.atomic import atomic_dir, write_json_atomic
from covidseg.config import DatasetParams, PrepareParams, SplitParams
from covidseg.data.folder import FolderSource, check_declared_encoding, folder_source
from covidseg.data.labels import scheme_for, target_mask
from covidseg.data.parallel import map_cases, worker_count
from covidseg.data.resample import resized_spacing, to_square
from covidseg.data.splits import make_splits
from covidseg.data.store import CaseMeta, write_store
from covidseg.data.transforms import model_input, recipe_of
from covidseg.data.volumes import CaseFiles, find_cases, load_case


def prepare_case(
    files: CaseFiles, params: PrepareParams, *, encoding: str | None = None
) -> tuple[dict[str, np.ndarray], CaseMeta]:
    """Load, check, normalise and resize one case; return its arrays and attributes. A folder
    dataset's case (`encoding`: `dataset.encoding`) is judged by its values, not its name."""
    scheme = scheme_for(params.target)
    size = params.image_size
    loaded = load_case(files)
    image, masks = loaded.image, loaded.masks
    del loaded  # from here on each volume is dropped as soon as nothing needs it
    if encoding is not None:
        check_declared_encoding(image.data, files.name, encoding)
    prepared = model_input(image, files.name, recipe_of(params), dataset=encoding is None)
    shape, spacing, affine = image.data.shape, image.spacing, image.affine
    del image  # the raw CT: the largest array not stored
    mask, lungs = target_mask(masks, scheme, files.name)
    del masks
    arrays = {"image": prepared.image, "mask": to_square(mask, size, True)}
    del mask
    if lungs is not None:
        arrays["lung"] = to_square(lungs, size, True)
        del lungs
    meta = CaseMeta(
        case=files.name,
        encoding=prepared.encoding,
        target=params.target,
        original_shape=shape,
        original_spacing=spacing,
        spacing=resized_spacing(spacing, shape[1], shape[2], size),
        affine=affine.tolist(),
        hu_window=params.hu_window,
        slice_has_infection=tuple(
            int((plane == scheme.infection).any()) for plane in arrays["mask"]
        ),
    )
    return arrays, meta


@dataclass(frozen=True)
class _StoreTask:
    files: CaseFiles
    params: PrepareParams
    path: Path
    encoding: str | None


def _write_case(task: _StoreTask) -> None:
    """One case's store (run in a worker process: only paths and params cross over)."""
    arrays, meta = prepare_case(task.files, task.params, encoding=task.encoding)
    write_store(task.path, arrays, meta, task.params.compression)


def prepare_dataset(
    params: PrepareParams,
    split: SplitParams,
    *,
    raw_dir: Path,
    out_dir: Path,
    splits_path: Path,
    dataset: DatasetParams | None = None,
    workers: int | None = 1,
) -> dict[str, dict[str, list[str]]]:
    """Write `<case>.h5` for every case and every fold's split; nothing is left half-written.
    `workers` processes (None: one per core) write the same bytes as one."""
    cases = find_cases(raw_dir)
    names = [c.name for c in cases]
    source: FolderSource | None = None
    if dataset is not None and dataset.source == "folder":
        source = folder_source(raw_dir, dataset, names, params.target)
    patients = source.patients if source else None
    splits = make_splits(split, names, patients=patients)  # fail before hours of work
    encoding = source.encoding if source else None
    with atomic_dir(out_dir) as tmp:
        tasks = [_StoreTask(f, params, tmp / f"{f.name}.h5", encoding) for f in cases]
        map_cases(_write_case, tasks, workers=worker_count(workers, len(tasks)), desc="prepare")
    write_json_atomic(splits_path, splits)
    return splits
