"""The resumable training checkpoint: everything needed to go on after the last epoch.

It holds only tensors and plain data (numbers, strings, lists, dicts), so it loads with
`torch.load(..., weights_only=True)`: a planted or damaged file can never run code. A file that
cannot be read is moved aside (`last.pt.corrupt-<time>`, kept for inspection) and training
starts afresh; so does a run whose best weights (`best.pt`) are damaged or missing.
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

LAST = "last.pt"  # the resumable checkpoint, rewritten every epoch
BEST = "best.pt"  # the best epoch's weights, exported as the model when training ends


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
    save_tensors(path, payload)


def save_tensors(path: Path, payload: object) -> None:
    """`torch.save` atomically, through a file object: a full disk is then Python's own
    OSError (one line naming the file), not torch's message about zip positions."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save(payload, f)


def _move_aside(path: Path) -> Path:
    """Rename a file that cannot be used to `<name>.corrupt-<time>`, kept for inspection."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    return aside


def _set_aside(path: Path, reason: str) -> None:
    """Keep a checkpoint that cannot be used beside it, and say so in one line."""
    aside = _move_aside(path)
    log.warning("%s cannot be resumed (%s); kept as %s, starting afresh", path, reason, aside.name)


def drop_run(checkpoint_dir: Path) -> str:
    """Set aside the best weights and the checkpoint that relies on them, so that the fold is
    trained from the start; which files were kept, as words."""
    kept = [_move_aside(p) for p in (checkpoint_dir / BEST, checkpoint_dir / LAST) if p.exists()]
    return " and ".join(p.name for p in kept) or "nothing"


def _load_error(error: Exception) -> str:
    """`Type: first sentence of the message` in one short line (`EOFError` for an empty file)."""
    text = " ".join(str(error).split()).split(". ")[0]
    text = text if len(text) <= 150 else text[:147] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read(path: Path) -> dict[str, Any] | None:
    """The checkpoint's payload, or None (set aside) when it is damaged or unsafe."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, or a pickle that asks to run code
        _set_aside(path, _load_error(error))
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        _set_aside(path, "not a covidseg checkpoint")
        return None
    return payload


def best_weights_error(path: Path, model: torch.nn.Module) -> str | None:
    """Why the best weights at `path` cannot be `model`'s (missing, damaged, or another
    network's); None when they load."""
    if not path.is_file():
        return "missing"
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, empty, or a pickle that asks to run code
        return _load_error(error)
    expected = model.state_dict()
    if not isinstance(weights, dict) or weights.keys() != expected.keys():
        return "not this model's weights"
    if any(
        not isinstance(v, torch.Tensor) or v.shape != expected[k].shape for k, v in weights.items()
    ):
        return "not this model's weights"
    return None


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
    best = path.with_name(BEST)
    if payload["state"].get("best_epoch") and (reason := best_weights_error(best, parts["model"])):
        # resuming would fail the fold at its very end, on every run: train it again
        log.warning(
            "%s: %s; kept %s, training the fold from the start", best, reason, drop_run(path.parent)
        )
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
