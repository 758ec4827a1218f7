"""`prepare` with 1 and 2 worker processes (`runtime.prepare_workers`), and one worker's memory.

Data: a folder dataset in nnU-Net's raw layout holding one synthetic coronacases-like case
(bench/_synth.py) hard-linked under N case ids (every case costs the same), labelled
{background 0, lesion 1} or, with `--lungs`, {background, lung_left, lung_right, lesion}; the
download stage's `ingest_folder` links it into the Zenodo layout, then the stage function
`prepare_dataset(..., workers=W)` runs at the default recipe (512 px, float16, gzip). MB/s counts
the decoded CT voxels (int16). The stores of every worker count are compared byte for byte.

Each worker count runs twice: the first run of 2 workers includes starting the pool (a fork
server that imports the stage's modules, torch among them, once); cases/s and MB/s are the
second run's. Memory: one case of `--memory-slices` slices x 512 x 512 through what a worker
runs for it (`prepare_case` + `write_store`; with `--lungs` at `prepare.target: lung_infection`)
in a fresh process: its peak RSS (VmHWM), its RSS after the imports alone (MiB) and its time.

--quick: 4 cases of 24 slices, memory on a 24-slice case.

Usage: .venv/bin/python bench/prepare_workers.py [--quick] [--cases N] [--slices S]
       [--memory-slices 600] [--lungs]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import load_note, machine_note, table, timed
from _synth import Phantom, make_phantom, write_nifti

from covidseg.config import DatasetParams, PrepareParams, SplitParams
from covidseg.data.folder import ingest_folder
from covidseg.data.prepare import prepare_dataset

WORKERS = (1, 2)
LESION = {"background": 0, "lesion": 1}
LUNGS = {"background": 0, "lung_left": 1, "lung_right": 2, "lesion": 3}


def labels_of(phantom: Phantom, lungs: bool) -> np.ndarray:
    """The label volume (slice, row, col): lesions, and with `lungs` the lung halves (from the
    phantom's lung HU band) split at the mid column."""
    if not lungs:
        return phantom.infection
    lung = (phantom.hu > -960) & (phantom.hu < -600)
    out = np.zeros(phantom.hu.shape, np.uint8)
    mid = phantom.hu.shape[2] // 2
    out[:, :, :mid][lung[:, :, :mid]] = LUNGS["lung_right"]  # the viewer's left
    out[:, :, mid:][lung[:, :, mid:]] = LUNGS["lung_left"]
    out[phantom.infection > 0] = LUNGS["lesion"]
    return out


def write_folder(root: Path, *, cases: int, slices: int, lungs: bool) -> tuple[Path, int]:
    """The folder dataset; (its path, the decoded image bytes of one case)."""
    folder = root / "dataset"
    phantom = make_phantom(slices, 512, seed=0)
    first = folder / "imagesTr" / "case_000_0000.nii.gz"
    write_nifti(first, phantom.hu)
    write_nifti(folder / "labelsTr" / "case_000.nii.gz", labels_of(phantom, lungs))
    for i in range(1, cases):
        os.link(first, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        os.link(
            folder / "labelsTr" / "case_000.nii.gz", folder / "labelsTr" / f"case_{i:03d}.nii.gz"
        )
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": LUNGS if lungs else LESION,
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder, phantom.hu.nbytes


def run_prepare(raw: Path, out: Path, dataset: DatasetParams, workers: int) -> float:
    """Wall seconds of the stage function with `workers` processes."""
    split = SplitParams(scheme="kfold", n_folds=2, folds=(0, 1))
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the progress bar
        wall, _ = timed(
            lambda: prepare_dataset(
                PrepareParams(),
                split,
                raw_dir=raw,
                out_dir=out / "prepared",
                splits_path=out / "splits.json",
                dataset=dataset,
                workers=workers,
            )
        )
    return wall


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*"))}


def _status_mb(key: str) -> float | None:
    """A `/proc/self/status` memory line in MiB (Linux), else None."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB: VmHWM on Linux (ru_maxrss there keeps the
    forking parent's peak across exec), else ru_maxrss (bytes on macOS)."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux; elsewhere the peak so far)."""
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def child_memory(raw: str, out: str, labels: str) -> None:
    """In a fresh process: one case through `prepare_case` + `write_store`; print the RSS and
    the case's wall and CPU seconds."""
    from covidseg.data.prepare import prepare_case
    from covidseg.data.store import write_store
    from covidseg.data.volumes import find_cases

    files = find_cases(Path(raw))[0]
    imported = rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    params = PrepareParams(target="lung_infection") if labels == "lungs" else PrepareParams()
    arrays, meta = prepare_case(files, params, encoding="hu")
    write_store(Path(out) / "case.h5", arrays, meta)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(json.dumps({"imported": imported, "peak": peak_rss_mb(), "wall": wall, "cpu": cpu}))


def memory(root: Path, *, slices: int, lungs: bool) -> dict[str, float]:
    """Peak RSS of one worker's work on a `slices` x 512 x 512 case (a fresh process)."""
    folder, _ = write_folder(root / "memory", cases=1, slices=slices, lungs=lungs)
    raw = root / "memory" / "raw"
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        ingest_folder(DatasetParams(source="folder", folder=str(folder)), raw)
    labels = "lungs" if lungs else "lesion"
    command = [sys.executable, __file__, "--child-memory", str(raw), str(root / "memory"), labels]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small cases")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--memory-slices", type=int, default=600)
    parser.add_argument("--lungs", action="store_true", help="lung labels too (whole_lungs runs)")
    parser.add_argument("--child-memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(*args.child_memory)
        return
    cases, slices, memory_slices = args.cases, args.slices, args.memory_slices
    if args.quick:
        cases, slices, memory_slices = 4, 24, 24
    print(machine_note())
    print(f"{cases} cases of {slices} x 512 x 512 (int16), labels: {'lungs + ' * args.lungs}lesion")
    root = Path(tempfile.mkdtemp(prefix="prepare-workers-"))
    try:
        folder, case_bytes = write_folder(root, cases=cases, slices=slices, lungs=args.lungs)
        dataset = DatasetParams(source="folder", folder=str(folder))
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            ingest_s, _ = timed(lambda: ingest_folder(dataset, root / "raw", workers=1))
        print(f"ingest (1 worker): {ingest_s:.2f} s, {cases / ingest_s:.2f} cases/s")
        rows, stores = [], []
        for workers in WORKERS:  # twice: the first run of a pool starts its fork server
            first = run_prepare(root / "raw", root / f"w{workers}a", dataset, workers)
            wall = run_prepare(root / "raw", root / f"w{workers}", dataset, workers)
            mb_s = cases * case_bytes / 1e6 / wall
            rows.append([workers, round(first, 2), round(wall, 2), round(cases / wall, 3), mb_s])
            stores += [digests(root / f"w{workers}{run}" / "prepared") for run in ("a", "")]
        print(table(["workers", "1st run s", "2nd run s", "cases/s", "MB/s"], rows))
        print(f"speed-up 2 workers / 1 (2nd runs): {rows[0][2] / rows[1][2]:.2f}x")
        print(f"stores identical across worker counts: {all(s == stores[0] for s in stores)}")
        peak = memory(root, slices=memory_slices, lungs=args.lungs)
        print(
            f"peak RSS per worker, one {memory_slices} x 512 x 512 case: {peak['peak']:.0f} MiB "
            f"({peak['imported']:.0f} MiB after imports alone); the case took "
            f"{peak['wall']:.1f} s ({peak['cpu']:.1f} s CPU)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(load_note())


if __name__ == "__main__":
    main()
