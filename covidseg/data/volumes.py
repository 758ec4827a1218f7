"""Finding, reading, checking and reorienting the dataset's NIfTI volumes.

Every volume is brought to one canonical orientation from its header (never by per-case rules):
array axes (slice, row, column) point to (Superior, Posterior, Left), i.e. slices run from the
feet up and each slice is shown as radiologists read it: anterior at the top, the patient's
right on the viewer's left.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from covidseg.errors import CovidSegError

CANONICAL_AXCODES = ("S", "P", "L")
IMAGE_ARCHIVE = "COVID-19-CT-Seg_20cases"
INFECTION_ARCHIVE = "Infection_Mask"
LUNG_ARCHIVE = "Lung_Mask"
LUNG_INFECTION_ARCHIVE = "Lung_and_Infection_Mask"
LABEL_SETS = {
    INFECTION_ARCHIVE: frozenset({0, 1}),
    LUNG_ARCHIVE: frozenset({0, 1, 2}),
    LUNG_INFECTION_ARCHIVE: frozenset({0, 1, 2, 3}),
}
MASK_ARCHIVES = tuple(LABEL_SETS)
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class CaseFiles:
    """One case's image and the masks found for it, keyed by archive folder name."""

    name: str
    image: Path
    masks: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    """A volume in canonical orientation: array (slice, row, col) and its affine."""

    data: np.ndarray
    affine: np.ndarray
    on_disk_shape: tuple[int, ...]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, col)."""
        s, r, c = (float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))
        return s, r, c


def case_name(path: Path) -> str:
    """`coronacases_001.nii.gz` -> `coronacases_001`."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _nifti_files(folder: Path) -> dict[str, Path]:
    files = sorted([*folder.glob("*.nii.gz"), *folder.glob("*.nii")])
    return {case_name(path): path for path in files}


def find_cases(raw_dir: Path) -> list[CaseFiles]:
    """Pair every image with its masks; a case missing a partner is an error naming it."""
    images = _nifti_files(raw_dir / IMAGE_ARCHIVE)
    if not images:
        raise CovidSegError(f"no CT volumes (*.nii.gz) in {raw_dir / IMAGE_ARCHIVE}")
    present = [name for name in MASK_ARCHIVES if (raw_dir / name).is_dir()]
    if not present:
        raise CovidSegError(f"no mask archive folder in {raw_dir} (expected {INFECTION_ARCHIVE})")
    masks = {archive: _nifti_files(raw_dir / archive) for archive in present}
    for archive, files in masks.items():
        orphans = sorted(set(files) - set(images))
        if orphans:
            raise CovidSegError(f"{orphans[0]}: mask in {archive} has no CT volume")
    cases = []
    for name, image in images.items():
        missing = [archive for archive in present if name not in masks[archive]]
        if missing:
            raise CovidSegError(f"{name}: no partner mask in {', '.join(missing)}")
        cases.append(CaseFiles(name, image, {a: masks[a][name] for a in present}))
    return cases


def read_nifti(path: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode a NIfTI file to (array as on disk, affine); any corruption names the case."""
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise CovidSegError(f"{case}: {path.name} is not a NIfTI image")
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise CovidSegError(f"{case}: cannot read {path.name} ({error})") from None
    except nib.filebasedimages.ImageFileError as error:
        raise CovidSegError(f"{case}: {path.name} is not a NIfTI image ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:  # a 3D scan saved with one time point
        data = data[..., 0]
    if data.ndim != 3:
        raise CovidSegError(f"{case}: {path.name} is not a 3D volume (shape {data.shape})")
    return data, image.affine


def reorient(data: np.ndarray, affine: np.ndarray) -> Volume:
    """Bring an (x, y, z) array to the canonical (S, P, L) axes; the affine follows."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES))
    out = np.ascontiguousarray(apply_orientation(data, transform))
    new_affine = affine @ inv_ornt_aff(transform, data.shape)
    return Volume(out, new_affine, tuple(data.shape))


def to_disk_orientation(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `reorient`: a canonical (S, P, L) array back to the axes of `affine`."""
    transform = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(data, transform))


def check_finite(data: np.ndarray, case: str, what: str) -> None:
    """Refuse NaN or Inf (only floats can hold them)."""
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise CovidSegError(f"{case}: {what} contains NaN or Inf values")


def label_values(mask: np.ndarray) -> set[int | float]:
    """The set of values in a mask; fast for small non-negative integers."""
    if np.issubdtype(mask.dtype, np.unsignedinteger) and mask.dtype.itemsize <= 2:
        # order="K": nibabel arrays are Fortran-ordered; a C-order ravel would copy the volume
        return {int(v) for v in np.flatnonzero(np.bincount(mask.ravel(order="K")))}
    return {float(v) if not float(v).is_integer() else int(v) for v in np.unique(mask)}


def check_mask(mask: np.ndarray, case: str, archive: str) -> np.ndarray:
    """Refuse values outside the archive's label set; return the mask as uint8."""
    check_finite(mask, case, f"{archive} mask")
    allowed = LABEL_SETS[archive]  # each set is {0, ..., k}: min, max and integrality decide
    integral = np.issubdtype(mask.dtype, np.integer) or bool(np.all(mask == np.round(mask)))
    if integral and mask.min() >= 0 and mask.max() <= max(allowed):
        return mask.astype(np.uint8, copy=False)
    extra = label_values(mask) - allowed  # slow path, only to name the offending values
    raise CovidSegError(
        f"{case}: {archive} mask has values {sorted(extra)} outside {sorted(allowed)}"
    )


def affines_match(a: np.ndarray, b: np.ndarray) -> bool:
    """Same voxel grid to within a micrometre."""
    return bool(np.allclose(a, b, rtol=0, atol=AFFINE_TOLERANCE_MM))


@dataclass(frozen=True)
class LoadedCase:
    """A checked case in canonical orientation: raw image values and uint8 masks."""

    name: str
    image: Volume
    masks: dict[str, np.ndarray]


def read_mask(
    path: Path, case: str, archive: str, image_shape: tuple[int, ...], *, image_affine: np.ndarray
) -> np.ndarray:
    """Read one mask and check it lies on its image's voxel grid and holds allowed labels."""
    data, affine = read_nifti(path, case)
    if data.shape != image_shape:
        raise CovidSegError(f"{case}: {archive} mask shape {data.shape} != image {image_shape}")
    if not affines_match(affine, image_affine):
        raise CovidSegError(
            f"{case}: {archive} mask affine differs from the image's "
            f"(max difference {np.abs(affine - image_affine).max():.4g} mm)"
        )
    return check_mask(data, case, archive)


def load_case(files: CaseFiles) -> LoadedCase:
    """Read a case, run every integrity check, and reorient image and masks together."""
    data, affine = read_nifti(files.image, files.name)
    check_finite(data, files.name, "image")
    masks = {
        archive: read_mask(path, files.name, archive, data.shape, image_affine=affine)
        for archive, path in files.masks.items()
    }
    image = reorient(data, affine)
    oriented = {archive: reorient(mask, affine).data for archive, mask in masks.items()}
    return LoadedCase(files.name, image, oriented)
