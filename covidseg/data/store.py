"""HDF5 slice stores: one file per case, one slice per chunk (fastMRI-style).

Layout of `<case>.h5`:
- `image`: float16/float32 in [0, 1], shape (slices, H, W), chunks (1, H, W)
- `mask`: uint8 labels, same shape and chunks
- `lung` (when lung masks exist): uint8 {0 background, 1 left, 2 right}, same shape
- attributes: see `CaseMeta`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from covidseg.atomic import atomic_file
from covidseg.errors import CovidSegError

# gzip level 1 after byte shuffling: small, fast enough, and deterministic. h5py's lzf is
# faster but not byte-reproducible (its hash table starts uninitialised), so it is opt-in.
COMPRESSION = {
    "gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "lzf": {"compression": "lzf", "shuffle": True},
    "none": {},
}


@dataclass(frozen=True)
class CaseMeta:
    """What a store records about its case besides the arrays."""

    case: str
    encoding: str
    target: str
    original_shape: tuple[int, int, int]  # canonical (slice, row, col) before resizing
    original_spacing: tuple[float, float, float]  # mm, canonical axes
    spacing: tuple[float, float, float]  # mm after resizing
    affine: list[list[float]]  # canonical original grid -> scanner mm (RAS)
    hu_window: tuple[float, float]
    slice_has_infection: tuple[int, ...]

    @classmethod
    def from_attrs(cls, attrs: h5py.AttributeManager) -> CaseMeta:
        """Read the attributes written by `write_store`."""
        raw = {key: attrs[key] for key in cls.__dataclass_fields__}
        shape = [int(v) for v in raw["original_shape"]]
        spacing, original = ([float(v) for v in raw[k]] for k in ("spacing", "original_spacing"))
        low, high = (float(v) for v in raw["hu_window"])
        return cls(
            case=str(raw["case"]),
            encoding=str(raw["encoding"]),
            target=str(raw["target"]),
            original_shape=(shape[0], shape[1], shape[2]),
            original_spacing=(original[0], original[1], original[2]),
            spacing=(spacing[0], spacing[1], spacing[2]),
            affine=np.asarray(raw["affine"]).tolist(),
            hu_window=(low, high),
            slice_has_infection=tuple(int(v) for v in raw["slice_has_infection"]),
        )


def write_store(
    path: Path,
    arrays: dict[str, np.ndarray],
    meta: CaseMeta,
    compression: str = "gzip",
) -> None:
    """Write one case store atomically; reruns are byte-identical. Non-finite values are refused."""
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise CovidSegError(f"{meta.case}: refusing to store {name} with NaN or Inf values")
    with (
        atomic_file(path) as tmp,
        h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f,
    ):
        for name, array in arrays.items():
            chunks = (1, *array.shape[1:])
            f.create_dataset(
                name, data=array, chunks=chunks, track_times=False, **COMPRESSION[compression]
            )
        for key, value in asdict(meta).items():
            f.attrs[key] = np.asarray(value) if not isinstance(value, str) else value


def read_meta(path: Path) -> CaseMeta:
    """The attributes of one store."""
    with h5py.File(path, "r") as f:
        return CaseMeta.from_attrs(f.attrs)


def read_arrays(path: Path, names: tuple[str, ...] = ("image", "mask")) -> dict[str, np.ndarray]:
    """Whole arrays of one store (for evaluation; training reads single slices)."""
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in names if name in f}
