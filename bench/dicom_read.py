"""Reading a CT series from DICOM files against reading the same volume from a `.nii.gz`.

A seeded 512 x 512 chest phantom (300 slices) is written as an uncompressed DICOM series (one
file per slice, stored with RescaleIntercept -1024 as most scanners do, names without an
extension) and
as an (L, A, S) `.nii.gz`. Each path runs in a fresh process, as `covidseg predict` reads a
scan: the DICOM one finds the series (`series_inputs`) and decodes it (`read_series`), the
NIfTI one `read_nifti`s; both then build the model input (`transforms.scan_input` at 512 px).
Reported: wall time of the read and of read + model input (median of the repeats), peak
resident memory of each process (and of a process that only imports the same modules), and
whether both give the same canonical volume.

Usage: .venv/bin/python bench/dicom_read.py [--quick] [--slices N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import load_note, machine_note, median, spread, table
from _synth import SPACING, make_phantom, write_nifti
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from covidseg.data.dicom import read_series, series_inputs
from covidseg.data.transforms import Recipe, scan_input
from covidseg.data.volumes import read_nifti

def peak_mib():  # this process's own high-water mark (ru_maxrss would count the parent's)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

mode, path = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
if mode == "imports":
    print(json.dumps({"rss": peak_mib()}))
    sys.exit()
if mode == "dicom":
    series, problems = series_inputs(path, frozenset())
    assert not problems, problems
    volume = read_series(series[0])
    data, affine = np.asanyarray(volume.image.dataobj), volume.image.affine
else:
    data, affine = read_nifti(path, "case")
read = time.perf_counter() - start
prepared, canonical = scan_input(data, affine, "case", Recipe((-1250.0, 250.0), data.shape[0]))
total = time.perf_counter() - start
if len(sys.argv) > 3:
    np.save(sys.argv[3], canonical.data)
print(json.dumps({"read": read, "total": total, "rss": peak_mib()}))
"""


def write_series(folder: Path, hu: np.ndarray) -> None:
    """(slice, row, col) = (S, P, L) HU as axial images: rows run posterior, columns to the
    patient's left (ImageOrientationPatient 1 0 0 0 1 0), slices foot to head."""
    folder.mkdir(parents=True)
    sz, sy, sx = SPACING
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, image in enumerate(hu):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Phantom", "0", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * sz]
        ds.PixelSpacing = [sy, sx]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (image.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"{k:08d}", enforce_file_format=True)  # names without extension


def run(mode: str, path: Path, save: Path | None = None) -> dict[str, float]:
    """One fresh process reading `path` the `mode` way; its times (s) and peak RSS (MiB)."""
    command = [sys.executable, "-c", CHILD, mode, str(path), *([str(save)] if save else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 slices of 256 px")
    parser.add_argument("--slices", type=int, help="default 300 (24 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs of each path, default 3 (1 with --quick)")
    args = parser.parse_args()
    slices = args.slices or (24 if args.quick else 300)
    size = 256 if args.quick else 512
    repeats = args.repeats or (1 if args.quick else 3)
    print(machine_note())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        hu = make_phantom(slices, size, seed=0).hu
        write_series(folder / "series", hu)
        write_nifti(folder / "case.nii.gz", hu)
        del hu
        series_mib, nifti_mib = size_mib(folder / "series"), size_mib(folder / "case.nii.gz")
        print(
            f"{slices} slices of {size} x {size}: DICOM series {series_mib:.0f} MiB "
            f"(uncompressed, {slices} files), .nii.gz {nifti_mib:.0f} MiB"
        )
        results: dict[str, list[dict[str, float]]] = {"dicom": [], "nifti": []}
        for _ in range(repeats):
            results["dicom"].append(run("dicom", folder / "series"))
            results["nifti"].append(run("nifti", folder / "case.nii.gz"))
        rows: list[list[object]] = []
        stats: dict[str, tuple[float, float, float]] = {}  # mode -> (read, read + input, RSS)
        for mode, runs in results.items():
            reads, totals = [r["read"] for r in runs], [r["total"] for r in runs]
            stats[mode] = (median(reads), median(totals), max(r["rss"] for r in runs))
            read, total, rss = stats[mode]
            rows.append([mode, read, spread(reads), total, spread(totals), rss])
        print(table(["path", "read s", "spread", "read+input s", "spread", "peak RSS MiB"], rows))
        dicom, nifti = stats["dicom"], stats["nifti"]
        base = run("imports", folder)["rss"]
        print(
            f"ratio DICOM/NIfTI: read {dicom[0] / nifti[0]:.2f}x, read + model input "
            f"{dicom[1] / nifti[1]:.2f}x, peak RSS {dicom[2] / nifti[2]:.2f}x"
        )
        print(
            f"peak RSS above the imports' {base:.0f} MiB: DICOM {dicom[2] - base:.0f} MiB, "
            f"NIfTI {nifti[2] - base:.0f} MiB"
        )
        run("dicom", folder / "series", folder / "dicom.npy")
        run("nifti", folder / "case.nii.gz", folder / "nifti.npy")
        same = np.array_equal(np.load(folder / "dicom.npy"), np.load(folder / "nifti.npy"))
        print(f"canonical volumes voxel for voxel equal: {same}")
    print(load_note())


if __name__ == "__main__":
    main()
