"""The resumable training checkpoint: everything needed to go on after the last epoch.

It holds only tensors and plain data (numbers, strings, lists, dicts), so it loads with
`torch.load(..., weights_only=True)`: a planted or damaged file can never run code. A file that
cannot be read is moved aside (`last.pt.corrupt-<time>`, kept for inspection) and training
starts afresh.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from covidseg.atomic import atomic_file

log = logging.getLogger(__name__)


class EpochRow(TypedDict):
    """One epoch of training, as `State.history` keeps it and the per-epoch log shows it."""

    epoch: int
    train_loss: float
    val_loss: float | None  # None without validation cases
    val_dice: float | None
    lr: float
    seconds: float


class Parts(TypedDict):
    """The objects whose state dicts a checkpoint holds besides `State`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class State:
    """Everything a checkpoint holds besides the state dicts of model, optimizer, scheduler."""

    epoch: int = 0
    run_id: str | None = None
    history: list[EpochRow] | None = None
    best_epoch: int = 0
    best_dice: float = -1.0
    bad_epochs: int = 0
    complete: bool = False


def rng_state() -> dict[str, object]:
    """Every random generator's state as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
        "cuda": cuda,
    }


def set_rng_state(saved: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(saved["torch"])
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = saved["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if saved.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def save_checkpoint(path: Path, state: State, parts: Parts, fp: str) -> None:
    """Write the resumable checkpoint atomically."""
    payload = {
        "fingerprint": fp,
        "state": asdict(state),
        "rng": rng_state(),
        "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(),
        "scheduler": parts["scheduler"].state_dict(),
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def _set_aside(path: Path, reason: str) -> None:
    """Keep a checkpoint that cannot be used beside it, and say so in one line."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    log.warning("%s cannot be resumed (%s); kept as %s, starting afresh", path, reason, aside.name)


def _read(path: Path) -> dict[str, Any] | None:
    """The checkpoint's payload, or None (set aside) when it is damaged or unsafe."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, or a pickle that asks to run code
        _set_aside(path, " ".join(f"{type(error).__name__}: {error}".split())[:160])
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        _set_aside(path, "not a covidseg checkpoint")
        return None
    return payload


def load_checkpoint(path: Path, parts: Parts, fp: str) -> State | None:
    """Restore a checkpoint made with the same params; None when there is none to resume."""
    if not path.exists():
        return None
    payload = _read(path)
    if payload is None:
        return None
    if payload.get("fingerprint") != fp:
        log.info("%s was made with other params or another split; starting afresh", path)
        return None
    if payload["state"].get("complete"):
        # DVC reran a finished stage, so something it depends on changed: train again
        log.info("%s holds a finished run; starting afresh", path)
        return None
    try:
        parts["model"].load_state_dict(payload["model"])
        parts["optimizer"].load_state_dict(payload["optimizer"])
        parts["scheduler"].load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        return State(**payload["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        _set_aside(path, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
        return None
