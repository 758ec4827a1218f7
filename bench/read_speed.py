"""Random single-slice reads from the slice stores through a 2-worker DataLoader.

`covidseg.training.dataset.SliceDataset` over synthetic stores (float16 images, gzip as `prepare`
writes them) against the same arrays in memory-mapped `.npy` files (the memory-bound limit),
at 512 and 128 px; then with augmentation on through `BalancedSampler`. All files are freshly
written, so reads are warm (page cache). Also the in-process cost per slice (1 thread).

Usage: .venv/bin/python bench/read_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import load_note, machine_note, median, spread, table, timed
from _synth import make_phantom, write_case_store
from torch.utils.data import DataLoader, Dataset

from covidseg.config import AugmentParams
from covidseg.training.dataset import BalancedSampler, SliceDataset

WORKERS = 2
BATCH = 2
CASES = 2
CONSUMERS = {"CPU training": (0.1, 15.0), "GPU training": (25.0, 150.0)}


class NpyDataset(Dataset):
    """The same slices from memory-mapped `.npy` files, opened lazily in each process."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        counts = [np.load(f / "mask.npy", mmap_mode="r").shape[0] for f in folders]
        self.refs = [(c, k) for c, n in enumerate(counts) for k in range(n)]
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case, k = self.refs[index]
        if case not in self._arrays:
            folder = self.folders[case]
            self._arrays[case] = (
                np.load(folder / "image.npy", mmap_mode="r"),
                np.load(folder / "mask.npy", mmap_mode="r"),
            )
        image, mask = self._arrays[case]
        image_t = torch.from_numpy(image[k].astype(np.float32))[None]
        return image_t, torch.from_numpy(mask[k].astype(np.int64))


class Uint8MaskDataset(SliceDataset):
    """What-if: `SliceDataset` returning uint8 masks (1 byte a pixel instead of 8)."""

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = super().__getitem__(item)
        return image, mask.to(torch.uint8)


class ZeroDataset(Dataset):
    """No reading at all: the DataLoader's own ceiling (worker -> main shared-memory transfer)."""

    def __init__(self, size: int, mask_dtype: torch.dtype, length: int) -> None:
        self.size, self.mask_dtype, self.length = size, mask_dtype, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.zeros(1, self.size, self.size)
        return image, torch.zeros(self.size, self.size, dtype=self.mask_dtype)


def build_data(root: Path, size: int, slices: int) -> tuple[list[Path], list[Path]]:
    """`CASES` stores and the same arrays as `.npy` folders, at `size` px."""
    stores, folders = [], []
    for case in range(CASES):
        phantom = make_phantom(slices, size, seed=case)
        store = root / f"{size}" / f"case_{case}.h5"
        store.parent.mkdir(parents=True, exist_ok=True)
        image, mask = write_case_store(store, phantom, size)
        folder = root / f"{size}" / f"case_{case}_npy"
        folder.mkdir()
        np.save(folder / "image.npy", image)
        np.save(folder / "mask.npy", mask)
        stores.append(store)
        folders.append(folder)
    return stores, folders


def loader_rate(dataset: Dataset, sampler: Iterable[Any]) -> float:
    """Slices per second through a 2-worker DataLoader, timed after the first batch."""
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=WORKERS)
    iterator = iter(loader)
    next(iterator)  # worker start and first reads are not timed
    seconds, count = timed(lambda: sum(len(image) for image, _ in iterator))
    return count / seconds


def random_indices(n_items: int, n_reads: int, seed: int) -> list[int]:
    """Plain seeded random slice indices (with replacement)."""
    return np.random.default_rng(seed).integers(0, n_items, size=n_reads).tolist()


def per_slice_ms(dataset: Dataset, items: list) -> float:
    """In-process milliseconds per `dataset[item]`, one torch thread (as in a worker)."""
    dataset[items[0]]
    seconds, _ = timed(lambda: [dataset[item] for item in items])
    return 1000 * seconds / len(items)


def bench_size(root: Path, size: int, slices: int, reads: int, repeats: int) -> list[list]:
    """Rows (store, npy, store + augmentation) for one size."""
    stores, folders = build_data(root, size, slices)
    plain, npy = SliceDataset(stores), NpyDataset(folders)
    augmented = SliceDataset(stores, AugmentParams())
    sets: dict[str, Dataset] = {
        "store": plain,
        "npy": npy,
        "store+aug": augmented,
        "store, uint8 mask (what-if)": Uint8MaskDataset(stores),
        "no reads, int64 mask": ZeroDataset(size, torch.int64, len(plain)),
        "no reads, uint8 mask": ZeroDataset(size, torch.uint8, len(plain)),
    }
    rates: dict[str, list[float]] = {name: [] for name in sets}
    for r in range(repeats):
        indices = random_indices(len(plain), reads, seed=r)
        for name, dataset in sets.items():
            sampler = BalancedSampler(augmented.positive, 0.5, reads, seed=r)
            rates[name].append(loader_rate(dataset, sampler if name == "store+aug" else indices))
    sample = random_indices(len(plain), min(reads, 300), seed=99)
    seeds = list(BalancedSampler(augmented.positive, 0.5, len(sample), seed=99))
    ms = {
        "store": per_slice_ms(plain, sample),
        "npy": per_slice_ms(npy, sample),
        "store+aug": per_slice_ms(augmented, seeds),
    }
    return [[size, k, median(v), spread(v), ms.get(k, "-")] for k, v in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 60 slices, 200 reads, 2 repeats"
    )
    args = parser.parse_args()
    slices, reads, repeats = (60, 200, 2) if args.quick else (250, 1500, 3)
    torch.set_num_threads(1)
    print(machine_note(), f"| {CASES} cases x {slices} slices per size, {reads} random reads,")
    print(f"DataLoader: {WORKERS} workers, batch {BATCH}; median of {repeats} repeats")
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        rows = [
            row
            for size in (512, 128)
            for row in bench_size(Path(tmp), size, slices, reads, repeats)
        ]
    print(table(["size", "source", "slices/s", "range", "ms/slice 1 thread"], rows))
    print_ratios(rows)
    print(load_note())


def print_ratios(rows: list[list]) -> None:
    """Store/npy ratios, augmentation cost, and headroom over what training consumes."""
    by = {(row[0], row[1]): row for row in rows}
    for size in (512, 128):
        store, npy, aug = by[(size, "store")], by[(size, "npy")], by[(size, "store+aug")]
        int64, uint8 = by[(size, "no reads, int64 mask")], by[(size, "no reads, uint8 mask")]
        print(
            f"{size} px: store/npy throughput {store[2] / npy[2]:.2f}x "
            f"(npy is {npy[2] / store[2]:.1f}x faster); augmentation adds "
            f"{aug[4] - store[4]:.2f} ms/slice in-process; with it the loader gives "
            f"{aug[2]:.0f} slices/s; loader ceiling {int64[2]:.0f} slices/s with int64 masks, "
            f"{uint8[2]:.0f} with uint8 ({uint8[2] / int64[2]:.2f}x)"
        )
        for name, (_, high) in CONSUMERS.items():
            print(f"  vs {name} (up to {high:g} slices/s): {aug[2] / high:.1f}x headroom")


if __name__ == "__main__":
    main()
