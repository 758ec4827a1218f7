"""`prepare` speed on a full-size synthetic coronacases-like case against its bare I/O.

Stage: `covidseg.data.prepare.prepare_dataset` over two cases (the same NIfTI files under two names,
hard-linked, because a k-fold split needs two patients); times are per case. Bare I/O: nibabel
decode of image and mask plus an h5py write of the same result arrays with the same dtype,
chunks and `covidseg.data.store.COMPRESSION`. Parts: the functions `prepare_case` calls, one by one.

`--quick` is a smoke run of the script: a 40-slice case instead of 300, 2 repeats of the first
configuration and 1 of the others.

Usage: .venv/bin/python bench/prepare_speed.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import h5py
import nibabel as nib
import numpy as np
import torch
from _report import load_note, machine_note, median, spread, table, timed, timed_cpu, verdict
from _synth import make_phantom, write_nifti

from covidseg.config import PrepareParams, SplitParams
from covidseg.data.intensity import check_encoding, normalise
from covidseg.data.labels import scheme_for, target_mask
from covidseg.data.prepare import prepare_case, prepare_dataset
from covidseg.data.resample import to_square
from covidseg.data.store import COMPRESSION, CaseMeta, write_store
from covidseg.data.volumes import (
    IMAGE_ARCHIVE,
    INFECTION_ARCHIVE,
    CaseFiles,
    LoadedCase,
    affines_match,
    check_finite,
    check_mask,
    read_nifti,
    reorient,
)

GOAL = 1.5
T = TypeVar("T")
CASES = ("coronacases_001", "coronacases_002")
Compression = Literal["gzip", "lzf", "none"]  # `prepare.compression`
CONFIGS: tuple[tuple[int, Compression], ...] = (
    (512, "gzip"),
    (512, "lzf"),
    (512, "none"),
    (256, "gzip"),
)
PARTS = ("decode", "checks", "reorient", "normalise", "resize", "cast", "target", "write")


def write_raw(raw: Path, slices: int) -> None:
    """One phantom case in the Zenodo layout, hard-linked under a second case name."""
    phantom = make_phantom(slices, 512, seed=0)
    for archive, array in ((IMAGE_ARCHIVE, phantom.hu), (INFECTION_ARCHIVE, phantom.infection)):
        first = raw / archive / f"{CASES[0]}.nii.gz"
        write_nifti(first, array)
        os.link(first, raw / archive / f"{CASES[1]}.nii.gz")


def case_files(raw: Path, name: str) -> CaseFiles:
    """The files of one case, as `find_cases` pairs them."""
    mask = raw / INFECTION_ARCHIVE / f"{name}.nii.gz"
    return CaseFiles(name, raw / IMAGE_ARCHIVE / f"{name}.nii.gz", {INFECTION_ARCHIVE: mask})


def run_stage(raw: Path, work: Path, params: PrepareParams) -> tuple[float, float]:
    """(wall, CPU) seconds per case of the real stage function."""
    out = work / "prepared"
    split = SplitParams(scheme="kfold", n_folds=2, folds=(0, 1))
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the progress bar
        wall, cpu, _ = timed_cpu(
            lambda: prepare_dataset(
                params, split, raw_dir=raw, out_dir=out, splits_path=work / "splits.json"
            )
        )
    shutil.rmtree(out)
    return wall / len(CASES), cpu / len(CASES)


def decode(path: Path) -> np.ndarray:
    """Bare nibabel decode of one volume."""
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return np.asanyarray(image.dataobj)


def bare_write(path: Path, arrays: dict[str, np.ndarray], compression: str) -> None:
    """Bare h5py write: same dtypes, one slice per chunk, same filters."""
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            chunks = (1, *array.shape[1:])
            f.create_dataset(
                name, data=array, chunks=chunks, track_times=False, **COMPRESSION[compression]
            )


def run_bare(
    raw: Path, work: Path, arrays: dict[str, np.ndarray], compression: str
) -> tuple[float, float]:
    """(wall, CPU) seconds per case of decode (image + mask) and write (the stage's arrays)."""

    def once() -> None:
        for name in CASES:
            files = case_files(raw, name)
            decode(files.image)
            decode(files.masks[INFECTION_ARCHIVE])
            bare_write(work / f"{name}.h5", arrays, compression)

    wall, cpu, _ = timed_cpu(once)
    return wall / len(CASES), cpu / len(CASES)


def cpu(fn: Callable[[], T]) -> tuple[float, T]:
    """(CPU seconds, result): the parts are small, so load from other jobs would swamp wall time."""
    _, seconds, result = timed_cpu(fn)
    return seconds, result


def profile_parts(files: CaseFiles, params: PrepareParams, work: Path) -> dict[str, float]:
    """CPU seconds per step of `load_case` + `prepare_case` + `write_store`, one by one."""
    t: dict[str, float] = {}
    mask_path = files.masks[INFECTION_ARCHIVE]
    t["decode"], ((data, affine), (mask, mask_affine)) = cpu(
        lambda: (read_nifti(files.image, files.name), read_nifti(mask_path, files.name))
    )

    def checks() -> tuple[str, np.ndarray]:
        check_finite(data, files.name, "image")
        _ = mask.shape == data.shape and affines_match(mask_affine, affine)
        checked = check_mask(mask, files.name, INFECTION_ARCHIVE)
        return check_encoding(data, files.name), checked

    t["checks"], (encoding, checked) = cpu(checks)
    t["reorient"], (image, oriented) = cpu(
        lambda: (reorient(data, affine), reorient(checked, affine).data)
    )
    t["normalise"], norm = cpu(lambda: normalise(image.data, encoding, params.hu_window))
    size = params.image_size
    t["resize"], (square, mask_sq) = cpu(
        lambda: (to_square(norm, size, labels=False), to_square(oriented, size, True))
    )
    t["cast"], stored = cpu(lambda: square.astype(params.image_dtype))
    loaded = LoadedCase(files.name, image, {INFECTION_ARCHIVE: oriented})
    t["target"], flags = cpu(
        lambda: (
            target_mask(loaded.masks, scheme_for(params.target), files.name),
            (mask_sq == 1).any(axis=(1, 2)),
        )
    )
    meta = dummy_meta(files.name, image.data.shape, flags)
    arrays = {"image": stored, "mask": mask_sq}
    t["write"], _ = cpu(lambda: write_store(work / "parts.h5", arrays, meta, params.compression))
    return t


def dummy_meta(name: str, shape: tuple[int, ...], flags: tuple) -> CaseMeta:
    """Attributes of the right kinds (their values do not change the write cost)."""
    return CaseMeta(
        case=name,
        encoding="hu",
        target="infection",
        original_shape=(shape[0], shape[1], shape[2]),
        original_spacing=(1.0, 0.7, 0.7),
        spacing=(1.0, 0.7, 0.7),
        affine=np.eye(4).tolist(),
        hu_window=(-1250.0, 250.0),
        slice_has_infection=tuple(int(v) for v in flags[1]),
    )


def diagnostics(raw: Path) -> list[list[object]]:
    """The two costly steps against alternatives that give the same result (median of 3)."""
    mask, _ = read_nifti(case_files(raw, CASES[0]).masks[INFECTION_ARCHIVE], CASES[0])
    c_order = np.ascontiguousarray(mask)
    image = np.random.default_rng(0).random(mask.shape, dtype=np.float32)
    calls = {
        "check_mask(mask as decoded: Fortran order)": lambda: check_mask(
            mask, "c", INFECTION_ARCHIVE
        ),
        "check_mask(C-ordered copy of it)": lambda: check_mask(c_order, "c", INFECTION_ARCHIVE),
        "np.bincount(mask.ravel(order='K'))": lambda: np.bincount(mask.ravel(order="K")),
        "mask.max() (enough for {0..k} label sets)": lambda: mask.max(),
        "float32 -> float16: ndarray.astype": lambda: image.astype(np.float16),
        "float32 -> float16: torch .half() (same bits)": lambda: (
            torch.from_numpy(image).half().numpy()
        ),
    }
    return [[label, median([timed(fn)[0] for _ in range(3)])] for label, fn in calls.items()]


def bench_config(
    raw: Path, work: Path, size: int, compression: Compression, repeats: int
) -> tuple[list[Any], dict[str, float]]:
    """Median stage and bare seconds per case, and the median parts, for one config."""
    params = PrepareParams(image_size=size, compression=compression)
    files = case_files(raw, CASES[0])
    arrays, _ = prepare_case(files, params)
    stage, bare, parts = [], [], []
    for _ in range(repeats):
        stage.append(run_stage(raw, work, params))
        bare.append(run_bare(raw, work, arrays, compression))
        parts.append(profile_parts(files, params, work))
    store_mb = (work / "parts.h5").stat().st_size / 2**20
    med_parts = {k: median([p[k] for p in parts]) for k in PARTS}
    sw, bw = [s[0] for s in stage], [b[0] for b in bare]
    sc, bc = median([s[1] for s in stage]), median([b[1] for b in bare])
    wall = [median(sw), spread(sw), median(bw), spread(bw), median(sw) / median(bw)]
    row = [f"{size} {compression}", *wall, sc, bc, sc / bc, f"{store_mb:.0f}"]
    return row, med_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="40 slices (else 300); 2 repeats of 512 gzip, 1 of the others (else 3)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every config")
    args = parser.parse_args()
    main_repeats = args.repeats or (2 if args.quick else 3)
    other_repeats = args.repeats or (1 if args.quick else 3)
    slices = 40 if args.quick else 300
    print(machine_note(), f"| repeats: {main_repeats} / {other_repeats} (median shown)")
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        raw, work = Path(tmp) / "raw", Path(tmp) / "work"
        work.mkdir()
        write_raw(raw, slices=slices)
        image_mb = (raw / IMAGE_ARCHIVE / f"{CASES[0]}.nii.gz").stat().st_size / 2**20
        raw_mb = 512 * 512 * slices * 2 / 2**20
        print(
            f"case: int16 512x512x{slices} on disk ({image_mb:.0f} MiB .nii.gz, "
            f"raw {raw_mb:.0f} MiB)"
        )
        results = [
            bench_config(raw, work, size, comp, main_repeats if i == 0 else other_repeats)
            for i, (size, comp) in enumerate(CONFIGS)
        ]
        extra = diagnostics(raw)
    print_results(results)
    print(f"\ncostly steps vs equivalent calls (s per 512x512x{slices} volume, median of 3):")
    print(table(["call", "s"], extra))
    print(load_note())


def print_results(results: list[tuple[list[Any], dict[str, float]]]) -> None:
    """The stage-vs-bare table, the parts table, and the goal line."""
    header = ["size comp", "stage s", "range", "bare s", "range", "ratio"]
    header += ["stage cpu", "bare cpu", "cpu ratio", "h5 MiB"]
    print("\nper case: prepare_dataset vs bare decode + h5py write (wall s, then CPU s)")
    print(table(header, [row for row, _ in results]))
    print("\nwhere the stage's time goes (CPU s per case, parts called one by one):")
    rows = [[row[0], *(parts[k] for k in PARTS), sum(parts.values())] for row, parts in results]
    print(table(["size comp", *PARTS, "sum"], rows))
    for row, _ in results:
        print(f"ratio {row[0]}: wall {verdict(float(row[5]), GOAL)}; CPU {float(row[8]):.2f}x")


if __name__ == "__main__":
    main()
