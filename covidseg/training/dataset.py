"""Training slices from the HDF5 stores, and a sampler that does not starve on infection.

Files are opened lazily inside whichever process reads (h5py handles cannot be pickled and
must not cross a fork), so the dataset works with any DataLoader start method.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from covidseg.config import AugmentParams
from covidseg.data.store import read_meta
from covidseg.training.augment import augment_batch, augment_slice, draw


class SliceDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every slice of the given stores; an item is `(index, seed)` or a plain index."""

    def __init__(
        self, paths: list[Path], augment: AugmentParams | None = None, sided: bool = False
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.sided = sided
        self.augment = augment if augment is not None and augment.enabled else None
        refs, positive = [], []
        for store, path in enumerate(self.paths):
            flags = read_meta(path).slice_has_infection
            refs += [(store, k) for k in range(len(flags))]
            positive += [bool(f) for f in flags]
        self.refs = np.asarray(refs, dtype=np.int64).reshape(-1, 2)
        self.positive = np.asarray(positive, dtype=bool)
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def _file(self, store: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if store not in self._files:
            self._files[store] = h5py.File(self.paths[store], "r")
        return self._files[store]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        store, k = self.refs[index]
        f = self._file(int(store))
        image = f["image"][k].astype(np.float32)
        mask = f["mask"][k]
        if self.augment is not None and seed is not None:
            rng = np.random.default_rng(seed)
            image, mask = augment_slice(image, mask, self.augment, rng, sided=self.sided)
        # uint8 masks cross from workers at an eighth of int64's size; the step widens them
        return torch.from_numpy(image)[None], torch.from_numpy(np.ascontiguousarray(mask))


def sampling_weights(positive: np.ndarray, positive_fraction: float) -> np.ndarray:
    """Per-slice probabilities giving infected slices `positive_fraction` of the draws."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(len(positive), 1.0 / len(positive))
    return np.where(positive, positive_fraction / n_pos, (1 - positive_fraction) / n_neg)


class BalancedSampler(Sampler[tuple[int, int]]):
    """Seeded draws with replacement, yielding `(index, augmentation seed)`; DDP-aware.

    The draws of epoch e depend only on (seed, e): a resumed run sees the same slices, and
    each of `world_size` ranks takes its own interleaved share.
    """

    def __init__(
        self,
        positive: np.ndarray,
        positive_fraction: float,
        num_samples: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.weights = sampling_weights(positive, positive_fraction)
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_samples * self.world_size
        draws = rng.choice(len(self.weights), size=total, p=self.weights)
        seeds = rng.integers(0, 2**31 - 1, size=total)
        for i in range(self.rank, total, self.world_size):
            yield int(draws[i]), int(seeds[i])


class DrawnSlices(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """A `SliceDataset` read plain, each item with its slice's `Draw.row` for `augment_batch`.

    The draws come from the same seeded generator as the dataset's own augmentation, so a
    sampler's `(index, seed)` means the same transform on either path.
    """

    def __init__(self, base: SliceDataset, params: AugmentParams) -> None:
        self.base, self.params, self.sided = base, params, base.sided
        self.positive = base.positive

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, seed = item
        image, mask = self.base[index]  # a plain index: read, not augmented
        return image, mask, draw(self.params, np.random.default_rng(seed)).row()

    def apply(
        self, image: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a collated batch (already on its device)."""
        return augment_batch(image, mask, rows, self.params, sided=self.sided)
