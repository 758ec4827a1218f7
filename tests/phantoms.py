"""Seeded synthetic stand-ins for the Zenodo archives: real NIfTI volumes inside real zips.

Each phantom is built in a canonical RAS frame (body ellipse, two lung ellipsoids, ground-glass
lesions inside the lungs) and then reoriented, arrays and affine together, to the requested
on-disk axis codes, so that labels and intensities stay anatomically consistent whatever the
orientation. The archive and member names are the real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

IMAGES = "COVID-19-CT-Seg_20cases.zip"
INFECTION = "Infection_Mask.zip"
LUNG = "Lung_Mask.zip"
LUNG_AND_INFECTION = "Lung_and_Infection_Mask.zip"
ALL_ARCHIVES = (IMAGES, INFECTION, LUNG, LUNG_AND_INFECTION)

AIR_HU, BODY_HU, LUNG_HU, LESION_HU = -1024, 40, -820, -400
NOISE_HU = 8.0
LESION_RADIUS_MM = 3.5
UINT8_WINDOW = (-1250.0, 250.0)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One synthetic case; every array is read-only and in on-disk (x, y, z) order."""

    name: str
    image: np.ndarray
    infection: np.ndarray
    lung: np.ndarray
    affine: np.ndarray
    encoding: str
    lesion_voxels: int
    hu: np.ndarray
    axcodes: tuple[str, str, str]
    spacing: tuple[float, float, float]

    @property
    def lung_and_infection(self) -> np.ndarray:
        """The Lung_and_Infection_Mask labels: 0 background, 1 left, 2 right, 3 infection."""
        return np.where(self.infection > 0, 3, self.lung).astype(np.uint8)


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    """The dataset authors' encoding: clip to [-1250, 250] HU and rescale to 0..255."""
    low, high = UINT8_WINDOW
    scaled = (np.clip(hu.astype(np.float64), low, high) - low) / (high - low) * 255.0
    return np.round(scaled).astype(np.uint8)


def _ellipsoid(
    coords: list[np.ndarray], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    """Boolean mask of the voxels whose centres lie inside an axis-aligned ellipsoid."""
    total = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii, strict=True))
    return np.asarray(total <= 1.0)


def _ras_anatomy(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, lung labels and infection of a phantom in RAS index order (mm coordinates centred)."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    ext = [n * s / 2 for n, s in zip(shape, spacing, strict=True)]
    body = _ellipsoid([x, y], (0.0, 0.0), (0.9 * ext[0], 0.8 * ext[1]))
    lung_radii = (0.3 * ext[0], 0.55 * ext[1], 0.65 * ext[2])
    # RAS: +x is the patient's right, so the left lung (label 1) sits at negative x.
    left = _ellipsoid([x, y, z], (-0.45 * ext[0], 0.0, 0.0), lung_radii)
    right = _ellipsoid([x, y, z], (0.45 * ext[0], 0.0, 0.0), lung_radii)
    lung = np.zeros(shape, np.uint16)
    lung[left & body] = 1
    lung[right & body] = 2
    infection = _lesions([x, y, z], lung, rng)
    hu = np.where(body, BODY_HU, AIR_HU).astype(np.float64)
    hu[lung > 0] = LUNG_HU
    hu[infection > 0] = LESION_HU
    hu += rng.normal(0.0, NOISE_HU, shape)
    return np.clip(np.round(hu), AIR_HU, 3071).astype(np.int16), lung, infection


def _lesions(coords: list[np.ndarray], lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three spheres centred on seeded lung voxels away from the lung ends, clipped to the lungs."""
    infection = np.zeros(lung.shape, np.uint8)
    z_mid = lung.shape[2] // 2
    central = np.zeros(lung.shape, bool)
    central[:, :, max(z_mid - 1, 0) : z_mid + 2] = True
    candidates = np.argwhere((lung > 0) & central)
    for index in rng.choice(len(candidates), size=3, replace=False):
        centre = tuple(float(c[tuple(candidates[index])]) for c in coords)
        infection[_ellipsoid(coords, centre, (LESION_RADIUS_MM,) * 3) & (lung > 0)] = 1
    return infection


def _reorient(
    arrays: list[np.ndarray], ras_affine: np.ndarray, axcodes: tuple[str, str, str]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Move RAS arrays to `axcodes` on disk, with the affine that keeps world positions."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(axcodes))
    moved = [np.ascontiguousarray(apply_orientation(a, transform)) for a in arrays]
    return moved, ras_affine @ inv_ornt_aff(transform, arrays[0].shape)


def _ras_geometry(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], axcodes: tuple[str, ...]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing in RAS index order from the on-disk ones."""
    ornt = axcodes2ornt(axcodes)
    ras_shape, ras_spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for disk_axis, (ras_axis, _flip) in enumerate(ornt.astype(int)):
        ras_shape[ras_axis], ras_spacing[ras_axis] = shape[disk_axis], spacing[disk_axis]
    return tuple(ras_shape), tuple(ras_spacing)  # type: ignore[return-value]


def make_case(
    name: str,
    *,
    encoding: str,
    shape: tuple[int, int, int],
    axcodes: tuple[str, str, str],
    spacing: tuple[float, float, float],
    seed: int,
) -> PhantomCase:
    """A seeded phantom: `shape` and `spacing` are per on-disk axis, `axcodes` its orientation."""
    if encoding not in ("hu", "uint8"):
        raise ValueError(f"encoding must be 'hu' or 'uint8', got {encoding!r}")
    ras_shape, ras_spacing = _ras_geometry(shape, spacing, axcodes)
    hu, lung, infection = _ras_anatomy(ras_shape, ras_spacing, np.random.default_rng(seed))
    ras_affine = np.diag([*ras_spacing, 1.0])
    ras_affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(ras_shape, ras_spacing, strict=True)]
    (hu, lung, infection), affine = _reorient([hu, lung, infection], ras_affine, axcodes)
    image = hu if encoding == "hu" else hu_to_uint8(hu)
    for array in (image, hu, lung, infection, affine):
        array.flags.writeable = False
    return PhantomCase(
        name=name,
        image=image,
        infection=infection,
        lung=lung,
        affine=affine,
        encoding=encoding,
        lesion_voxels=int(infection.sum()),
        hu=hu,
        axcodes=tuple(axcodes),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
    )


def default_cases(seed: int = 0) -> list[PhantomCase]:
    """Two coronacases-like HU volumes (L, A, S) and a radiopaedia-like uint8 one (P, R, I).

    In canonical (slice, row, col) axes the HU cases are 64x64 and the radiopaedia case is
    40x64 (non-square): at `prepare.image_size: 64` nothing is resized, only padded.
    """
    return [
        make_case(
            "coronacases_001",
            encoding="hu",
            shape=(64, 64, 12),
            axcodes=("L", "A", "S"),
            spacing=(0.8, 0.8, 5.0),
            seed=seed,
        ),
        make_case(
            "radiopaedia_4_85506_1",
            encoding="uint8",
            shape=(40, 64, 10),
            axcodes=("P", "R", "I"),
            spacing=(0.7, 0.7, 6.0),
            seed=seed + 1,
        ),
        make_case(
            "coronacases_002",
            encoding="hu",
            shape=(64, 64, 10),
            axcodes=("L", "A", "S"),
            spacing=(0.75, 0.75, 5.0),
            seed=seed + 2,
        ),
    ]


def canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Independent route to (slice, row, col) = (S, P, L): nibabel's RAS, then transpose/flip."""
    ras = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)
    return ras.transpose(2, 1, 0)[:, ::-1, ::-1]


def load_nifti(path: Path) -> nib.Nifti1Image:
    """`nib.load` of a NIfTI-1 file, as that type (nibabel types its result as any image)."""
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image), f"{path} is no NIfTI-1 image"
    return image


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """A `.nii.gz` file's bytes, qform and sform both set (code 1), deterministic gzip header."""
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def write_zip(path: Path, members: dict[str, bytes]) -> str:
    """Write a zip with fixed timestamps (so equal inputs give equal bytes); return its sha256."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _archive_array(case: PhantomCase, archive: str) -> np.ndarray:
    """Which of a case's arrays goes into which archive."""
    arrays = {
        IMAGES: case.image,
        INFECTION: case.infection,
        LUNG: case.lung,
        LUNG_AND_INFECTION: case.lung_and_infection,
    }
    return arrays[archive]


def write_archives(
    cases: list[PhantomCase], dest: Path, *, archives: tuple[str, ...] = ALL_ARCHIVES
) -> dict[str, str]:
    """Write the named archives (flat members `<case>.nii.gz`) into `dest`; {name: sha256}."""
    dest.mkdir(parents=True, exist_ok=True)
    sums = {}
    for archive in archives:
        members = {
            f"{case.name}.nii.gz": nifti_gz_bytes(_archive_array(case, archive), case.affine)
            for case in cases
        }
        sums[archive] = write_zip(dest / archive, members)
    return sums
