"""Tiny recipes and models shared by the tests: the one `TINY` params, and small fitted networks.

`TINY` is the smallest recipe that trains for real (Unet / MobileNet-v2 at 64 px, 2 epochs of 3
steps, one kfold fold); a test that needs other values names them with `merge(TINY, {...})`.
Importing this module is cheap (torch is imported by `train_tiny` only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from phantoms import AIR_HU

if TYPE_CHECKING:
    import torch

TINY: dict[str, Any] = {
    "arch": "Unet",
    "encoder": "mobilenet_v2",
    "prepare": {"image_size": 64},
    "split": {"scheme": "kfold", "n_folds": 3, "folds": [0], "val_fraction": 0.5},
    "train": {
        "epochs": 2,
        "batch_size": 4,
        "steps_per_epoch": 3,
        "lr": 1.0e-3,
    },
    "runtime": {"num_workers": 0, "eval_batch_size": 16},
}
WINDOW = (-1250.0, 250.0)  # the default recipe's HU window
AIR = (AIR_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])  # ~0.15, what the phantoms' air becomes


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `changes` into a copy of `base`."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def train_tiny(
    images: np.ndarray, masks: np.ndarray, steps: int, arch: str = "Unet"
) -> torch.nn.Module:
    """An `arch` / MobileNet-v2 fitted to binary masks, enough for sure labels."""
    import torch

    from covidseg.training.model import build_model

    torch.manual_seed(0)
    model = build_model(arch, "mobilenet_v2", None, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x, y = torch.from_numpy(images).float()[:, None], torch.from_numpy(masks).float()[:, None]
    rng = np.random.default_rng(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is as fast, and safe on a busy machine
    try:
        for _ in range(steps):
            pick = torch.from_numpy(rng.choice(len(x), size=8))
            optimizer.zero_grad()
            loss_fn(model(x[pick]), y[pick]).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
