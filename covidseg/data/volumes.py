"""Finding, reading, checking and reorienting the dataset's NIfTI volumes.

Every volume is brought to one canonical orientation from its header (never by per-case rules):
array axes (slice, row, column) point to (Superior, Posterior, Left), i.e. slices run from the
feet up and each slice is shown as radiologists read it: anterior at the top, the patient's
right on the viewer's left.
"""

from __future__ import annotations

import gzip
import math
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
# The most voxels a header may claim (a constant; `read_nifti(max_voxels=...)` for a caller):
# 2**31 is 14x a 512 x 512 x 1000 scan, and 8 GiB once the scan is float32.
MAX_VOXELS = 2**31
# Deflate cannot compress more than about 1032:1 (an all-zero volume reaches 1028:1; real CT
# 1.7-2.4:1, infection masks 110-350:1): a .gz file claiming more holds no such volume.
GZIP_MAX_RATIO = 1100
ORTHOGONAL_COSINE = 1e-6  # axes closer than this to perpendicular count as perpendicular
SINGULAR_RATIO = 1e-3  # |det| under this share of the column norms' product: no volume


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
        """Voxel size in mm along (slice, row, col); their product is the voxel volume."""
        return grid_spacing(self.affine)


def grid_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """(slice, row, col) voxel size in mm of a canonical affine: the row and column steps and
    the distance between slice planes. With perpendicular axes these are the column norms; with
    a sheared grid (a tilted gantry) the slice distance is shorter than the slice step, so that
    the product is always |det| of the affine's 3x3, the true voxel volume."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.sqrt((m**2).sum(axis=0))
    cosines = np.abs(m.T @ m) / np.outer(norms, norms)
    if (cosines - np.eye(3)).max() <= ORTHOGONAL_COSINE:
        return float(norms[0]), float(norms[1]), float(norms[2])
    area = float(np.linalg.norm(np.cross(m[:, 1], m[:, 2])))  # one slice's pixel
    row = float(norms[1])
    return abs(float(np.linalg.det(m))) / area, row, area / row


def voxel_volume_ml(spacing: tuple[float, float, float]) -> float:
    """One voxel's volume in mL from `grid_spacing` (mm): every mL the project reports."""
    return math.prod(spacing) / 1000.0


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


def read_nifti(
    path: Path, case: str, *, max_voxels: int = MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a NIfTI file to (array as on disk, affine); any corruption names the case. The
    header is checked first (voxel type, 3D, claimed size, geometry): nothing is allocated for
    a volume the file cannot hold."""
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise CovidSegError(f"{case}: {path.name} is not a NIfTI image")
        check_header(image, path, case, max_voxels=max_voxels)
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise CovidSegError(f"{case}: cannot read {path.name} ({error})") from None
    except nib.filebasedimages.ImageFileError as error:
        raise CovidSegError(f"{case}: {path.name} is not a NIfTI image ({error})") from None
    if data.ndim == 4:  # a 3D scan saved with one time point
        data = data[..., 0]
    return data, image.affine


def check_header(
    image: nib.Nifti1Image | nib.Nifti2Image, path: Path, case: str, *, max_voxels: int
) -> None:
    """Refuse, from the header alone, what is no 3D greyscale volume this file can hold."""
    dtype, shape = image.header.get_data_dtype(), tuple(int(n) for n in image.shape)
    if dtype.fields is not None or dtype.kind not in "biuf":
        kind = image.header.get_value_label("datatype")
        raise CovidSegError(f"{case}: {path.name} holds {kind} voxels, not CT intensities")
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        hint = ": colour channels?" if len(shape) == 4 and shape[3] in (3, 4) else ""
        raise CovidSegError(f"{case}: {path.name} is not a 3D volume (shape {shape}{hint})")
    check_claimed_size(image, path, case, max_voxels=max_voxels)
    check_affine(image.affine, case, path.name)


def _bytes(count: float) -> str:
    """`4.29 GB`: a byte count for a message."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def check_claimed_size(
    image: nib.Nifti1Image | nib.Nifti2Image, path: Path, case: str, *, max_voxels: int
) -> None:
    """The header's shape x dtype against the ceiling and against what the file can hold."""
    dtype, shape = image.header.get_data_dtype(), tuple(int(n) for n in image.shape)
    voxels = math.prod(shape)
    claimed = voxels * dtype.itemsize
    what = f"{path.name} claims {'x'.join(map(str, shape))} {dtype.name} voxels ({_bytes(claimed)})"
    if voxels > max_voxels:
        raise CovidSegError(f"{case}: {what}, over the limit of {max_voxels} voxels")
    size = path.stat().st_size
    if path.name.endswith(".gz") and claimed > size * GZIP_MAX_RATIO:
        raise CovidSegError(
            f"{case}: {what} but holds {_bytes(size)}, more than gzip can compress into that "
            f"({GZIP_MAX_RATIO}:1); damaged or not a scan"
        )
    if path.name.endswith(".nii") and int(image.header.get_data_offset()) + claimed > size:
        raise CovidSegError(f"{case}: {what} but the file has {_bytes(size)}; truncated?")


def check_affine(affine: np.ndarray, case: str, name: str) -> None:
    """Refuse geometry that gives no voxel volume: non-finite or singular (axes in a plane)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(affine).all():
        raise CovidSegError(f"{case}: {name}: the affine holds NaN or Inf; no voxel geometry")
    det = abs(float(np.linalg.det(m)))
    if not det > SINGULAR_RATIO * float(np.prod(np.sqrt((m**2).sum(axis=0)))):
        raise CovidSegError(
            f"{case}: {name}: the affine is singular (|det| of its 3x3 is {det:.3g} mm^3: its "
            "voxel axes span no volume); the header's geometry is broken"
        )


def slabs(slices: int, step: int) -> list[slice]:
    """Consecutive runs of `step` slices (the last may be shorter) covering `slices`: the steps
    of code that works a few slices at a time so that its temporaries stay small."""
    return [slice(start, min(start + step, slices)) for start in range(0, slices, step)]


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
    """Read a case, run every integrity check, and reorient image and masks together. One
    volume at a time: each array as on disk is dropped once its reoriented copy exists."""
    data, affine = read_nifti(files.image, files.name)
    check_finite(data, files.name, "image")
    shape = data.shape
    image = reorient(data, affine)
    del data
    oriented = {}
    for archive, path in files.masks.items():
        mask = read_mask(path, files.name, archive, shape, image_affine=affine)
        oriented[archive] = reorient(mask, affine).data
        del mask
    return LoadedCase(files.name, image, oriented)
