"""A dataset of your own in nnU-Net v2's raw layout: checked, then linked into `data/raw`.

The layout (nnU-Net v2's "raw" dataset, one CT channel):

    dataset.json                   channel_names {"0": "CT"}, labels {"background": 0, ...},
                                   numTraining, file_ending (.nii.gz or .nii)
    imagesTr/<case>_0000<ending>   CT in Hounsfield units
    labelsTr/<case><ending>        the label values of dataset.json
    imagesTs/<case>_0000<ending>   optional, unlabelled
    patients.csv                   optional: case,patient (cases of one patient stay together)

`ingest_folder` checks what can be checked without decoding the images (each image's header
against its label, each label's values against dataset.json) and writes `data/raw` in the
Zenodo record's layout, so that `prepare` and `evaluate` read a folder dataset through the one
path they read the record with: the images as `COVID-19-CT-Seg_20cases/<case><ending>`, the
labels as `Infection_Mask/<case>` ({0, 1}) or, when dataset.json names both lungs,
`Lung_and_Infection_Mask/<case>` ({0, 1 left, 2 right, 3 infection}). A file is reflinked where
the file system can, else hard-linked, else copied; a label whose values are not already those
is rewritten with them. dataset.json, patients.csv and `label_map.json` (which label became
what) are kept beside them.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
import shutil
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from covidseg.atomic import atomic_dir
from covidseg.config import DatasetParams
from covidseg.data.labels import (
    LEFT_LUNG,
    LUNG_INFECTION_VALUE,
    RIGHT_LUNG,
    LabelScheme,
    scheme_for,
)
from covidseg.data.parallel import map_cases, worker_count
from covidseg.data.volumes import (
    IMAGE_ARCHIVE,
    INFECTION_ARCHIVE,
    LUNG_INFECTION_ARCHIVE,
    MAX_VOXELS,
    affines_match,
    check_header,
    read_nifti,
    slabs,
)
from covidseg.errors import CovidSegError

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
PATIENTS_CSV = "patients.csv"
LABEL_MAP = "label_map.json"  # in data/raw: which label of the folder became what
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
ENDINGS = (".nii.gz", ".nii")
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
INFECTION_NAME = re.compile(r"infect|lesion", re.IGNORECASE)
MAX_LABEL = 65535
SLAB_VOXELS = 1 << 23  # labels are checked and remapped this many voxels at a time
FICLONE = 0x40049409  # Linux ioctl: share a file's extents, copy-on-write (btrfs, XFS, ...)


# --- dataset.json ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What dataset.json declares, as far as this pipeline reads it."""

    file_ending: str
    labels: dict[str, int]
    num_training: int


def read_layout(folder: Path) -> Layout:
    """Read and check `folder/dataset.json`; every problem is one line naming the key."""
    path = folder / DATASET_JSON
    if not path.is_file():
        raise CovidSegError(
            f"{path}: missing; a dataset in nnU-Net's raw layout describes itself there "
            f"({', '.join(REQUIRED_KEYS)})"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CovidSegError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CovidSegError(f"{path}: expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CovidSegError(
            f"{path}: missing key {missing[0]!r} (needs {', '.join(REQUIRED_KEYS)})"
        )
    _check_channels(raw["channel_names"], path)
    ending = raw["file_ending"]
    if ending not in ENDINGS:
        raise CovidSegError(f"{path}: file_ending {ending!r}: only NIfTI, .nii.gz or .nii")
    count = raw["numTraining"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise CovidSegError(f"{path}: numTraining {count!r} is not a count of cases")
    return Layout(ending, _label_values(raw["labels"], path), count)


def _check_channels(channels: Any, path: Path) -> None:
    """One channel, `{"0": "CT"}`: the intensities must be Hounsfield units."""
    if not isinstance(channels, dict) or not channels:
        raise CovidSegError(f'{path}: channel_names must map channels to names: {{"0": "CT"}}')
    if len(channels) > 1:
        names = ", ".join(str(name) for name in channels.values())
        raise CovidSegError(
            f"{path}: channel_names declares {len(channels)} channels ({names}); this pipeline "
            "takes one CT channel"
        )
    ((key, name),) = channels.items()
    if str(key) != "0" or str(name).upper() != "CT":
        raise CovidSegError(
            f'{path}: channel_names is {json.dumps(channels)}; this pipeline takes {{"0": "CT"}} '
            "(Hounsfield units)"
        )


def _label_values(labels: Any, path: Path) -> dict[str, int]:
    """`labels` as name -> value: integers, distinct, `background: 0`."""
    if not isinstance(labels, dict) or not labels:
        raise CovidSegError(f'{path}: labels must map names to values: {{"background": 0, ...}}')
    for name, value in labels.items():
        if isinstance(value, list):
            raise CovidSegError(
                f"{path}: label {name!r} is a region ({value}); give each label one value"
            )
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LABEL:
            raise CovidSegError(
                f"{path}: label {name!r} has value {value!r}, not an integer 0-{MAX_LABEL}"
            )
    if labels.get("background") != 0:
        raise CovidSegError(f"{path}: labels must include background: 0")
    shared = [v for v, n in Counter(labels.values()).items() if n > 1]
    if shared:
        names = [name for name, value in labels.items() if value == shared[0]]
        raise CovidSegError(f"{path}: labels {', '.join(names)} share the value {shared[0]}")
    return dict(labels)


# --- labels -> the pipeline's masks -----------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """Which of a dataset's labels is the infection, which are the lungs (when both are there);
    every other label counts as background."""

    labels: dict[str, int]
    infection: str
    left_lung: str | None = None
    right_lung: str | None = None

    @property
    def lungs(self) -> bool:
        return self.left_lung is not None and self.right_lung is not None

    @property
    def archive(self) -> str:
        """The Zenodo mask folder the labels become."""
        return LUNG_INFECTION_ARCHIVE if self.lungs else INFECTION_ARCHIVE

    @property
    def background(self) -> list[str]:
        """The labels besides background that count as background."""
        used = {"background", self.infection, self.left_lung, self.right_lung}
        return [name for name in self.labels if name not in used]

    def lut(self) -> np.ndarray:
        """Dataset value -> mask value (uint8, indexed by the dataset's values)."""
        lut = np.zeros(max(self.labels.values()) + 1, np.uint8)
        if self.left_lung is not None and self.right_lung is not None:
            lut[self.labels[self.left_lung]] = LEFT_LUNG
            lut[self.labels[self.right_lung]] = RIGHT_LUNG
            lut[self.labels[self.infection]] = LUNG_INFECTION_VALUE
        else:
            lut[self.labels[self.infection]] = 1
        return lut

    def scheme(self, target: str) -> LabelScheme:
        """The run's label scheme (`prepare.target`); lung labels only where there are lungs."""
        scheme = scheme_for(target)
        if scheme.multi and not self.lungs:
            raise CovidSegError(
                f"prepare.target: {target} needs a left and a right lung label in dataset.json, "
                f"which has {', '.join(self.labels)}; use prepare.target: infection"
            )
        return scheme

    def describe(self) -> str:
        """One line for the log."""
        text = f"infection = {self.infection!r} (value {self.labels[self.infection]})"
        if self.left_lung is not None and self.right_lung is not None:
            text += f", lungs = {self.left_lung!r} and {self.right_lung!r}"
        else:
            text += ", no lung labels"
        if self.background:
            text += f"; counted as background: {', '.join(self.background)}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "infection": self.infection,
            "left_lung": self.left_lung,
            "right_lung": self.right_lung,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LabelMap:
        return cls(
            labels={str(k): int(v) for k, v in raw["labels"].items()},
            infection=str(raw["infection"]),
            left_lung=raw["left_lung"],
            right_lung=raw["right_lung"],
        )


def resolve_labels(labels: dict[str, int], infection_label: str | None, where: Path) -> LabelMap:
    """The infection label (`dataset.infection_label`, else the one label named like infection
    or lesion) and the lungs (one label named like each of left and right lung)."""
    foreground = [name for name in labels if name != "background"]
    if infection_label is not None:
        if infection_label not in foreground:
            raise CovidSegError(
                f"dataset.infection_label: {infection_label!r} is not a label of {where} "
                f"({', '.join(foreground)})"
            )
        infection = infection_label
    else:
        candidates = [name for name in foreground if INFECTION_NAME.search(name)]
        if len(candidates) != 1:
            found = f"{len(candidates)} labels ({', '.join(candidates)})" if candidates else "none"
            raise CovidSegError(
                f"{where}: which label is the infection? Labels named like infection or lesion: "
                f"{found}; set dataset.infection_label to one of {', '.join(foreground)}"
            )
        infection = candidates[0]
    left, right = (_lung(foreground, side, infection, where) for side in ("left", "right"))
    if (left is None) != (right is None):
        left = right = None  # one lung alone makes no lung_infection target
    return LabelMap(dict(labels), infection, left, right)


def _lung(names: list[str], side: str, infection: str, where: Path) -> str | None:
    """The one label named like `side` lung (`left_lung`, `Lung Left`, ...), if any."""
    found = [
        name
        for name in names
        if name != infection and "lung" in name.lower() and side in name.lower()
    ]
    if len(found) > 1:
        raise CovidSegError(f"{where}: labels {', '.join(found)} all look like the {side} lung")
    return found[0] if found else None


# --- the files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderCase:
    """One training case of the layout."""

    name: str
    image: Path
    label: Path


def _entries(folder: Path, sub: str, *, required: bool) -> list[Path]:
    """The files of a sub-folder (hidden ones such as .DS_Store left out), sorted."""
    where = folder / sub
    if not where.is_dir():
        if required:
            raise CovidSegError(
                f"{where}: missing (the layout needs {IMAGES_TR}/ and {LABELS_TR}/)"
            )
        return []
    return sorted(path for path in where.iterdir() if not path.name.startswith("."))


def _cases(folder: Path, sub: str, ending: str, *, channel: bool) -> dict[str, Path]:
    """Case id -> file of one sub-folder; a file outside the pattern, a second channel, an
    odd case id or two ids that differ only in letter case is an error naming the file."""
    tail = r"_(?P<channel>\d{4})" if channel else ""
    pattern = re.compile(rf"(?P<case>.+){tail}{re.escape(ending)}")
    expected = f"{sub}/<case>{'_0000' if channel else ''}{ending}"
    found: dict[str, Path] = {}
    for path in _entries(folder, sub, required=sub != IMAGES_TS):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_file():
            raise CovidSegError(f"{sub}/{path.name}: outside the layout (expected {expected})")
        case = match["case"]
        if channel and match["channel"] != "0000":
            raise CovidSegError(
                f"{case}: {sub}/{path.name} is a second channel; this pipeline takes one CT "
                f"channel, {sub}/{case}_0000{ending}"
            )
        if not CASE_ID.fullmatch(case):
            raise CovidSegError(
                f"{case}: {sub}/{path.name}: a case id takes letters, digits, '.', '_' and '-'"
            )
        found[case] = path
    by_lower: dict[str, str] = {}
    for case in found:
        if (other := by_lower.setdefault(case.lower(), case)) != case:
            raise CovidSegError(
                f"{case}: duplicate case id in {sub}/ ({other!r} and {case!r} differ only in "
                "letter case: one file on case-insensitive file systems)"
            )
    return found


def find_folder_cases(folder: Path, layout: Layout) -> list[FolderCase]:
    """Every training case, its image paired with its label, sorted by case id."""
    ending = layout.file_ending
    images = _cases(folder, IMAGES_TR, ending, channel=True)
    labels = _cases(folder, LABELS_TR, ending, channel=False)
    for case in sorted(images.keys() - labels.keys()):
        raise CovidSegError(
            f"{case}: {IMAGES_TR}/{images[case].name} has no label ({LABELS_TR}/{case}{ending})"
        )
    for case in sorted(labels.keys() - images.keys()):
        raise CovidSegError(
            f"{case}: {LABELS_TR}/{labels[case].name} has no image "
            f"({IMAGES_TR}/{case}_0000{ending})"
        )
    if len(images) != layout.num_training:
        raise CovidSegError(
            f"{folder / DATASET_JSON}: numTraining is {layout.num_training} but {IMAGES_TR}/ "
            f"holds {len(images)} cases"
        )
    return [FolderCase(case, images[case], labels[case]) for case in sorted(images)]


def read_patients(path: Path, cases: list[str]) -> dict[str, str] | None:
    """case -> patient from `patients.csv` (header `case,patient`, every case once), or None
    when there is no such file."""
    if not path.is_file():
        return None
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CovidSegError(f"{path}: cannot read it ({error})") from None
    header = [cell.strip() for cell in rows[0]] if rows else []
    if header != ["case", "patient"]:
        raise CovidSegError(f"{path}: the first line must be the header case,patient")
    known, patients = set(cases), {}
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if len(cells) != 2 or not all(cells):
            raise CovidSegError(f"{path}: line {line}: expected case,patient, got {row}")
        case, patient = cells
        if case in patients:
            raise CovidSegError(f"{path}: line {line}: duplicate case id {case!r}")
        if case not in known:
            raise CovidSegError(f"{path}: line {line}: no case {case!r} in {IMAGES_TR}/")
        patients[case] = patient
    missing = [case for case in cases if case not in patients]
    if missing:
        raise CovidSegError(
            f"{path}: {len(missing)} cases have no patient (first: {missing[0]}); list every "
            "case, a patient of its own as case,case"
        )
    return patients


# --- ingest: the folder into data/raw -------------------------------------------------------


def link_file(source: Path, dest: Path) -> str:
    """Put `source` at `dest` without copying where the file system allows: a reflink, else a
    hard link, else a copy. How it was done, for the log."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _reflink(source, dest):
        return "reflinked"
    try:
        os.link(source, dest)
        return "hard-linked"
    except OSError:
        shutil.copyfile(source, dest)
        return "copied"


def _reflink(source: Path, dest: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        with source.open("rb") as src, dest.open("wb") as out:
            fcntl.ioctl(out.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        dest.unlink(missing_ok=True)
        return False


@dataclass(frozen=True)
class _IngestTask:
    case: FolderCase
    labels: LabelMap
    ending: str
    staging: Path


def _ingest_case(task: _IngestTask) -> tuple[str, str]:
    """Check one case and place it in `task.staging`; how the image and the label were put."""
    case, ending = task.case, task.ending
    image = _image_header(case.image, case.name)
    data, affine = read_nifti(case.label, case.name)
    where = f"{case.name}: {LABELS_TR}/{case.label.name}"
    if data.shape != image.shape[:3]:
        raise CovidSegError(
            f"{where} has shape {data.shape} but {IMAGES_TR}/{case.image.name} {image.shape[:3]}"
        )
    if not affines_match(affine, image.affine):
        raise CovidSegError(
            f"{where}: its affine differs from {IMAGES_TR}/{case.image.name}'s (max difference "
            f"{np.abs(affine - image.affine).max():.4g} mm): not on the image's voxel grid"
        )
    present = present_values(data, where)
    unknown = sorted(present - set(task.labels.labels.values()))
    if unknown:
        declared = sorted(task.labels.labels.values())
        raise CovidSegError(f"{where} has values {unknown} not among dataset.json's {declared}")
    how_image = link_file(case.image, task.staging / IMAGE_ARCHIVE / f"{case.name}{ending}")
    lut, folder = task.labels.lut(), task.staging / task.labels.archive
    if all(lut[value] == value for value in present):
        return how_image, link_file(case.label, folder / f"{case.name}{ending}")
    _write_remapped(case.label, data, lut, folder / f"{case.name}.nii.gz")
    return how_image, "rewritten"


def _image_header(path: Path, case: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """An image's header (no voxels are decoded), checked."""
    try:
        image = nib.load(path)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise CovidSegError(f"{case}: cannot read {IMAGES_TR}/{path.name} ({error})") from None
    except nib.filebasedimages.ImageFileError as error:
        raise CovidSegError(f"{case}: {IMAGES_TR}/{path.name} is not NIfTI ({error})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise CovidSegError(f"{case}: {IMAGES_TR}/{path.name} is not a NIfTI image")
    check_header(image, path, case, max_voxels=MAX_VOXELS)
    return image


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    """Ranges of the last axis covering about `SLAB_VOXELS` each (contiguous on disk)."""
    return slabs(shape[-1], max(1, SLAB_VOXELS // max(1, int(np.prod(shape[:-1])))))


def present_values(data: np.ndarray, where: str) -> set[int]:
    """The label values in a volume, slab by slab (no full-size temporary); non-integer,
    negative or non-finite values are an error."""
    present: set[int] = set()
    for part in _slabs(data.shape):
        slab = data[..., part]
        if slab.dtype.kind == "f":
            if not np.isfinite(slab).all() or not np.array_equal(slab, np.round(slab)):
                raise CovidSegError(f"{where} holds values that are not whole numbers")
            slab = slab.astype(np.int64)
        if slab.size and slab.min() < 0:
            raise CovidSegError(f"{where} holds negative values ({int(slab.min())})")
        counts = np.bincount(slab.astype(np.intp, copy=False).ravel(order="K"))
        present.update(int(v) for v in np.flatnonzero(counts))
    return present


def _write_remapped(source: Path, data: np.ndarray, lut: np.ndarray, dest: Path) -> None:
    """Write `lut[data]` as uint8 with `source`'s header (its geometry unchanged); gzip with
    no timestamp, so that a rerun writes the same bytes."""
    out = np.zeros(data.shape, np.uint8, order="F")
    for part in _slabs(data.shape):
        out[..., part] = lut[data[..., part].astype(np.intp)]
    original = nib.load(source)
    if not isinstance(original, nib.Nifti1Image | nib.Nifti2Image):  # read_nifti checked it
        raise CovidSegError(f"{source.name} is not a NIfTI image")
    header = original.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(original)(out, None, header)
    image.header.set_slope_inter(1.0, 0.0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def ingest_folder(params: DatasetParams, raw_dir: Path, *, workers: int | None = 1) -> list[str]:
    """Check the folder dataset of `params` and write it into `raw_dir` in the Zenodo layout
    (all or nothing); the case ids. `workers`: processes checking labels (None: the cores)."""
    folder = Path(params.folder).expanduser()
    if not folder.is_dir():
        raise CovidSegError(f"dataset.folder: no such folder {str(folder)!r}")
    layout = read_layout(folder)
    labels = resolve_labels(layout.labels, params.infection_label, folder / DATASET_JSON)
    cases = find_folder_cases(folder, layout)
    names = [case.name for case in cases]
    patients = read_patients(folder / PATIENTS_CSV, names)
    tests = _cases(folder, IMAGES_TS, layout.file_ending, channel=True)
    with atomic_dir(raw_dir) as staging:
        tasks = [_IngestTask(case, labels, layout.file_ending, staging) for case in cases]
        ways = map_cases(
            _ingest_case, tasks, workers=worker_count(workers, len(tasks)), desc="ingest"
        )
        for path in tests.values():
            link_file(path, staging / IMAGES_TS / path.name)
        shutil.copyfile(folder / DATASET_JSON, staging / DATASET_JSON)
        if patients is not None:
            shutil.copyfile(folder / PATIENTS_CSV, staging / PATIENTS_CSV)
        (staging / LABEL_MAP).write_text(json.dumps(labels.to_json(), indent=2) + "\n")
    log.info(
        f"{folder}: {len(cases)} training cases, {len(tests)} test images; {labels.describe()}"
    )
    log.info(
        f"into {raw_dir}: images {_tally(w[0] for w in ways)}; labels {_tally(w[1] for w in ways)}"
    )
    if patients is not None:
        log.info(f"{PATIENTS_CSV}: {len(cases)} cases of {len(set(patients.values()))} patients")
    return names


def _tally(ways: Any) -> str:
    """`20 hard-linked, 1 copied`."""
    return ", ".join(f"{count} {way}" for way, count in sorted(Counter(ways).items()))


# --- what prepare reads back ------------------------------------------------------------------


@dataclass(frozen=True)
class FolderSource:
    """What `prepare` needs of an ingested folder: the declared encoding and the patients."""

    encoding: str
    patients: dict[str, str]


def folder_source(
    raw_dir: Path, params: DatasetParams, cases: list[str], target: str
) -> FolderSource:
    """Read what `ingest_folder` left in `raw_dir`: the label map (the run's scheme must fit it)
    and the patients (without patients.csv each case is its own patient, and the log says so)."""
    path = raw_dir / LABEL_MAP
    try:
        labels = LabelMap.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CovidSegError(
            f"{path}: not an ingested folder dataset ({error}); rerun dvc repro download"
        ) from None
    labels.scheme(target)
    patients = read_patients(raw_dir / PATIENTS_CSV, cases)
    if patients is None:
        log.info(
            f"no {PATIENTS_CSV} in the dataset: each of the {len(cases)} cases is its own patient"
        )
        patients = {case: case for case in cases}
    return FolderSource(params.encoding, patients)


def check_declared_encoding(data: np.ndarray, case: str, encoding: str) -> None:
    """Refuse a volume whose values do not fit `dataset.encoding`: CT is in Hounsfield units
    (air about -1000 HU) unless the params say `uint8` (0-255 = the lung window [-1250, 250]
    HU) or `auto` (each volume told by its values, as the Zenodo archive needs)."""
    if encoding == "auto":
        return
    low, high = float(np.min(data)), float(np.max(data))
    if encoding == "hu" and low >= 0:
        if high <= 255:
            raise CovidSegError(
                f"{case}: image values {low:g}..{high:g} look like a 0-255 encoding, not "
                "Hounsfield units; if 0-255 is the lung window [-1250, 250] HU set "
                "dataset.encoding: uint8 (or auto)"
            )
        raise CovidSegError(
            f"{case}: image values {low:g}..{high:g} never go below 0, so they are not "
            "Hounsfield units (air is about -1000 HU); apply the scanner's rescale first"
        )
    if encoding == "uint8" and (low < 0 or high > 255):
        raise CovidSegError(
            f"{case}: image values {low:g}..{high:g} are outside 0-255 but dataset.encoding is "
            "uint8"
        )
