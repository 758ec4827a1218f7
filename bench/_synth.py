"""Seeded synthetic CT data shared by the benchmarks: a chest phantom, NIfTI files, slice stores.

The phantom is built slice by slice in (slice, row, col) = (z, y, x) order, with a circular
field of view, body, fat layer, spine, two lungs with texture and vessels, ground-glass lesions
and scanner-like noise, so that gzip compresses it about as well as a real CT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from covidseg.data.store import CaseMeta, write_store

OUTSIDE_FOV_HU, AIR_HU, FAT_HU, BODY_HU, BONE_HU = -1024, -1000, -100, 40, 600
LUNG_HU, LESION_HU = -850, -450
NOISE_HU = 18.0
SPACING = (1.0, 0.7, 0.7)  # mm along (slice, row, col)
HU_WINDOW = (-1250.0, 250.0)


@dataclass(frozen=True)
class Phantom:
    """HU volume (int16) and infection mask (uint8), both (slices, rows, cols)."""

    hu: np.ndarray
    infection: np.ndarray


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates in [-1, 1] for a size x size slice."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return axis[:, None], axis[None, :]


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]: coarse noise upsampled trilinearly."""
    coarse = rng.standard_normal((1, 1, max(shape[0] // 8, 2), 32, 32), dtype=np.float32)
    field = F.interpolate(torch.from_numpy(coarse), size=shape, mode="trilinear")
    return field[0, 0].numpy()


def _lung_radii(z: np.ndarray) -> np.ndarray:
    """Lung cross-section scale along the slices: small at apex and base, largest mid-chest."""
    return np.clip(np.sin(np.pi * z), 0.0, None) ** 0.5


def _slice(
    rows: np.ndarray, cols: np.ndarray, lung_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base HU, lung mask, FOV mask) of one slice before texture, lesions and noise."""
    fov = rows**2 + cols**2 <= 1.0
    body = (rows / 0.72) ** 2 + (cols / 0.9) ** 2 <= 1.0
    inner = (rows / 0.66) ** 2 + (cols / 0.84) ** 2 <= 1.0
    spine = ((rows - 0.5) / 0.12) ** 2 + (cols / 0.1) ** 2 <= 1.0
    lung = np.zeros_like(fov)
    if lung_scale > 0.05:
        for centre in (-0.42, 0.42):
            dr, dc = (rows + 0.05) / (0.5 * lung_scale), (cols - centre) / (0.3 * lung_scale)
            lung |= dr**2 + dc**2 <= 1.0
    hu = np.full(fov.shape, OUTSIDE_FOV_HU, np.float32)
    hu[fov] = AIR_HU
    hu[body] = FAT_HU
    hu[inner] = BODY_HU
    hu[spine] = BONE_HU
    hu[lung & inner] = LUNG_HU
    return hu, lung & inner, fov


def _lesions(lung: np.ndarray, rng: np.random.Generator, count: int = 12) -> np.ndarray:
    """Spherical ground-glass lesions centred on seeded lung voxels, clipped to the lungs."""
    infection = np.zeros(lung.shape, np.uint8)
    candidates = np.argwhere(lung)
    n, size = lung.shape[0], lung.shape[1]
    for index in rng.choice(len(candidates), size=count, replace=False):
        cz, cy, cx = candidates[index]
        r = rng.uniform(0.03, 0.08) * size
        rz = max(int(r * SPACING[1] / SPACING[0] * size / 512), 1)
        z0, z1 = max(cz - rz, 0), min(cz + rz + 1, n)
        yy, xx = np.ogrid[:size, :size]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2
        for z in range(z0, z1):
            frac = 1.0 - ((z - cz) / (rz + 1)) ** 2
            infection[z][(disc <= r * r * frac) & lung[z]] = 1
    return infection


def make_phantom(slices: int, size: int, seed: int) -> Phantom:
    """A seeded chest phantom of `slices` x `size` x `size` voxels (int16 HU, uint8 infection)."""
    rng = np.random.default_rng(seed)
    rows, cols = _grid(size)
    texture = _smooth_field((slices, size, size), rng)
    hu = np.empty((slices, size, size), np.int16)
    lung = np.zeros((slices, size, size), bool)
    for z, scale in enumerate(_lung_radii((np.arange(slices) + 0.5) / slices)):
        base, lung[z], fov = _slice(rows, cols, float(scale))
        base[lung[z]] += 60.0 * texture[z][lung[z]]
        vessels = lung[z] & (np.abs(texture[z] - 0.6) < 0.03)
        base[vessels] = BODY_HU
        noise = rng.standard_normal((size, size), dtype=np.float32) * NOISE_HU
        hu[z] = np.where(fov, np.round(base + noise), OUTSIDE_FOV_HU).astype(np.int16)
    infection = _lesions(lung, rng)
    lesion = infection.astype(bool)
    hu[lesion] = np.clip(hu[lesion].astype(np.int32) + (LESION_HU - LUNG_HU), -1024, 3071)
    return Phantom(hu, infection)


def las_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of an on-disk (x, y, z) volume with axis codes (L, A, S), as coronacases."""
    sz, sy, sx = SPACING
    affine = np.diag([-sx, sy, sz, 1.0])
    affine[:3, 3] = [shape[0] * sx / 2, -shape[1] * sy / 2, -shape[2] * sz / 2]
    return affine


def write_nifti(path: Path, canonical: np.ndarray) -> None:
    """Write a (slice, row, col) array as an (L, A, S) `.nii.gz`, slices contiguous on disk."""
    on_disk = canonical[:, ::-1, :].T  # (x, y, z), Fortran order: each slice stays contiguous
    image = nib.Nifti1Image(on_disk, las_affine(on_disk.shape))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def window(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] under the lung window (float32)."""
    low, high = HU_WINDOW
    return (np.clip(hu.astype(np.float32), low, high) - low) / (high - low)


def resize_stack(stack: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """(slices, S, S) -> (slices, size, size): area-like bilinear, or nearest for labels."""
    if stack.shape[1] == size:
        return stack
    tensor = torch.from_numpy(np.ascontiguousarray(stack))[:, None].float()
    mode = {"mode": "nearest-exact"} if labels else {"mode": "bilinear", "antialias": True}
    out = F.interpolate(tensor, size=(size, size), **mode)[:, 0].numpy()
    return out.astype(np.uint8) if labels else out


def write_case_store(
    path: Path, phantom: Phantom, size: int, compression: str = "gzip"
) -> tuple[np.ndarray, np.ndarray]:
    """Write a store like `prepare` does (float16 image, uint8 mask); return both arrays."""
    image = resize_stack(window(phantom.hu), size, labels=False).astype(np.float16)
    mask = resize_stack(phantom.infection, size, labels=True)
    shape = phantom.hu.shape
    factor = shape[1] / size
    meta = CaseMeta(
        case=path.stem,
        encoding="hu",
        target="infection",
        original_shape=shape,
        original_spacing=SPACING,
        spacing=(SPACING[0], SPACING[1] * factor, SPACING[2] * factor),
        affine=np.eye(4).tolist(),
        hu_window=HU_WINDOW,
        slice_has_infection=tuple(int(v) for v in np.asarray(mask.any(axis=(1, 2)))),
    )
    write_store(path, {"image": image, "mask": mask}, meta, compression)
    return image, mask


def build_stores(root: Path, size: int, *, cases: int, slices: int) -> list[Path]:
    """`cases` phantom stores of `slices` slices at `size` px (float16, gzip), as `prepare`
    writes them."""
    paths = []
    for case in range(cases):
        path = root / f"case_{case}.h5"
        write_case_store(path, make_phantom(slices, size, seed=case), size)
        paths.append(path)
    return paths
