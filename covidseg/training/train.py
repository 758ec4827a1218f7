"""The `train` stage: U-Net++ (or any SMP model) on the slice stores, resumable and DDP-ready.

Every epoch ends in an atomic checkpoint of everything needed to resume (model, optimizer,
scheduler, scaler, epoch, RNG states, history, MLflow run id). The slices drawn in epoch e
depend only on (seed, e), so a run killed and resumed ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, cast, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from covidseg.atomic import write_json_atomic, write_text_atomic
from covidseg.config import Params
from covidseg.data.labels import LabelScheme, scheme_for
from covidseg.data.splits import load_splits
from covidseg.data.store import read_arrays
from covidseg.data.transforms import recipe_of
from covidseg.errors import CovidSegError
from covidseg.precision import autocast
from covidseg.stage import check_interrupt
from covidseg.tracking import Tracker
from covidseg.training.checkpoint import (
    BEST,
    LAST,
    EpochRow,
    Parts,
    State,
    best_weights_error,
    drop_run,
    load_checkpoint,
    save_checkpoint,
    save_tensors,
)
from covidseg.training.dataset import BalancedSampler, DrawnSlices, SliceDataset
from covidseg.training.losses import SegmentationLoss
from covidseg.training.model import build_model, resolve_device
from covidseg.training.modelio import ModelSpec, non_finite_count, save_model
from covidseg.training.validation import validate

log = logging.getLogger(__name__)

# the per-epoch log's columns: the keys of `EpochRow`
LogColumn = Literal["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"]
LOG_COLUMNS: tuple[LogColumn, ...] = get_args(LogColumn)
Batch = tuple[torch.Tensor, ...]  # a dataset item: (image, mask), or (image, mask, draws)


class TrainSummary(TypedDict):
    """`metrics/train.json`: the best epoch, the last epoch's losses and the run's speed."""

    fold: int
    best_epoch: int
    best_val_dice: float | None
    epochs_run: int
    final_train_loss: float | None
    final_val_loss: float | None
    slices_per_s: float | None
    world_size: int
    ranks_in_sync: bool


@dataclass(frozen=True)
class TrainPaths:
    data_dir: Path
    splits: Path
    model_dir: Path
    checkpoint_dir: Path
    metrics: Path
    log: Path


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def fingerprint(params: Params, splits: dict[str, list[str]]) -> str:
    """What a checkpoint must match to be resumed: model, recipe, data params, the validation
    threshold (it picks the best epoch) and the fold's split; never the `runtime` settings nor
    which other folds the experiment runs."""
    keys = {"arch", "encoder", "train", "prepare", "split"}
    recipe = params.model_dump(mode="json", include=keys, exclude={"split": {"folds"}})
    blob = json.dumps([recipe, params.evaluate.threshold, splits], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size())


def store_paths(data_dir: Path, cases: list[str]) -> list[Path]:
    """The stores of the named cases; a missing one is an error naming it."""
    paths = [data_dir / f"{case}.h5" for case in cases]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise CovidSegError(f"no prepared store for {', '.join(missing)} in {data_dir}")
    return paths


def make_loader(
    dataset: SliceDataset, params: Params, dist_info: Dist, device: torch.device
) -> DataLoader[Batch]:
    """Balanced, seeded draws; one epoch is `steps_per_epoch` batches or one pass.

    On CUDA with `train.gpu_augment`, workers only read slices and draw each slice's
    augmentation; `train_epoch` applies it to the batch on the GPU.
    """
    tp = params.train
    per_rank = (tp.steps_per_epoch * tp.batch_size) if tp.steps_per_epoch else len(dataset)
    per_rank = max(tp.batch_size, per_rank // dist_info.world_size)
    sampler = BalancedSampler(
        dataset.positive,
        tp.positive_fraction,
        per_rank,
        tp.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    workers = params.runtime.num_workers
    source: Dataset[Batch] = dataset
    if device.type == "cuda" and tp.gpu_augment and dataset.augment is not None:
        source = DrawnSlices(dataset, dataset.augment)  # workers read, the GPU augments
    return DataLoader(
        source,
        batch_size=tp.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=per_rank >= tp.batch_size,
    )


class Diverged(CovidSegError):
    """The training loss became NaN or infinite, or exploded."""

    def __init__(self, reason: str, advice: str = "lower train.lr") -> None:
        super().__init__(f"training diverged: {reason}; {advice}")
        self.reason, self.advice = reason, advice


def what_is_kept(error: Diverged, state: State, checkpoint_dir: Path) -> Diverged:
    """`error` saying what is left of the run: its best epoch so far, if there is one."""
    if state.best_epoch:
        kept = f"the best epoch so far ({state.best_epoch}) is kept in {checkpoint_dir / BEST}"
    else:
        kept = "no epoch finished, so there is no model to keep"
    return Diverged(error.reason, f"{kept} ({error.advice})")


class LossMeter:
    """Sum of loss x slices; on CUDA kept on the device and read (one sync) only when shown.

    It also notes the first step whose loss is not finite (on the device, without a sync);
    `check` turns that into a `Diverged` error naming the epoch and the step.
    """

    def __init__(
        self, device: torch.device, *, on_device: bool | None = None, epoch: int = 0
    ) -> None:
        self.on_device = device.type == "cuda" if on_device is None else on_device
        self.total: torch.Tensor | float = (
            torch.zeros((), dtype=torch.float64, device=device) if self.on_device else 0.0
        )
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.seen, self.steps, self.epoch = 0, 0, epoch

    def add(self, loss: torch.Tensor, slices: int) -> None:
        self.steps += 1
        if self.on_device:
            assert isinstance(self.total, torch.Tensor)
            self.total.add_(loss.detach(), alpha=slices)
            bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
            self.first_bad = torch.where(bad, self.steps, self.first_bad)
        else:
            value = loss.item()
            if not math.isfinite(value) and self.first_bad < 0:
                self.first_bad.fill_(self.steps)
            self.total += value * slices
        self.seen += slices

    def check(self) -> None:
        """Raise `Diverged` if a step's loss was not finite (one sync on CUDA)."""
        step = int(self.first_bad)
        if step >= 0:
            raise Diverged(
                f"the loss became NaN or infinite at epoch {self.epoch}, step {step}",
                "lower train.lr, or check the data",
            )

    def mean(self) -> float:
        return float(self.total) / max(self.seen, 1)


def device_batch(
    batch: list[torch.Tensor], loader: DataLoader[Batch], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on `device`, augmented there when the loader only drew the parameters."""
    image = batch[0].to(device, non_blocking=True)
    target = batch[1].to(device, non_blocking=True)
    if len(batch) == 3:  # (image, mask, draws) from `DrawnSlices`
        image, target = cast(DrawnSlices, loader.dataset).apply(image, target, batch[2])
    if device.type == "cuda":
        image = image.contiguous(memory_format=torch.channels_last)
    return image, target.long()


def _forward_loss(
    model: torch.nn.Module,
    loss_fn: SegmentationLoss,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    bf16: bool,
) -> torch.Tensor:
    """Logits of `model` and their loss, under bf16 autocast on CUDA when asked."""
    with autocast(image.device, bf16):
        loss: torch.Tensor = loss_fn(model(image), target)  # `Module.__call__` is untyped
        return loss


@functools.cache
def _compiled_forward_loss(mode: str | None) -> Callable[..., torch.Tensor]:
    return torch.compile(_forward_loss, mode=mode)


def forward_loss(compile_: bool, device: torch.device) -> Callable[..., torch.Tensor]:
    """`_forward_loss`, or its `torch.compile`d form (CUDA graphs on CUDA: static shapes)."""
    if not compile_:
        return _forward_loss
    return _compiled_forward_loss("reduce-overhead" if device.type == "cuda" else None)


def train_epoch(
    model: torch.nn.Module,
    loader: DataLoader[Batch],
    loss_fn: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    params: Params,
    epoch: int,
    show: bool,
) -> tuple[float, int]:
    """One pass over the sampler's draws; returns (mean loss, slices seen).

    On CUDA nothing waits for the GPU per step: the loss is summed on the device and read
    when the progress bar is redrawn (at most once a second) and at the end.
    """
    model.train()
    cast(BalancedSampler, loader.sampler).set_epoch(epoch)
    meter, shown = LossMeter(device, epoch=epoch), 0.0
    step = forward_loss(params.train.compile, device)
    graphs = params.train.compile and device.type == "cuda"
    bar = tqdm(loader, desc=f"epoch {epoch}/{params.train.epochs}", unit="batch", disable=not show)
    for batch in bar:
        check_interrupt()
        image, target = device_batch(batch, loader, device)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        loss = step(model, loss_fn, image, target, bf16=params.train.bf16)
        loss.backward()
        optimizer.step()
        meter.add(loss, len(image))
        if not meter.on_device or time.monotonic() - shown >= 1.0:
            meter.check()
            if show:
                bar.set_postfix(loss=f"{meter.mean():.4f}")
            shown = time.monotonic()
    meter.check()
    return meter.mean(), meter.seen


def weights_digest(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights, to check that DDP ranks agree."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def ranks_in_sync(model: torch.nn.Module, dist_info: Dist) -> bool:
    """True when every rank holds the same weights (trivially so without DDP)."""
    if dist_info.world_size == 1:
        return True
    device = next(model.parameters()).device
    digest = torch.tensor([weights_digest(model)], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(digest) for _ in range(dist_info.world_size)]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def write_log(path: Path, history: list[EpochRow]) -> None:
    """Per-epoch CSV that `dvc plots` draws; rewritten whole from the checkpoint's history."""
    lines = [",".join(LOG_COLUMNS)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in LOG_COLUMNS))
    write_text_atomic(path, "\n".join(lines) + "\n")


def model_spec(params: Params, state: State, fold: int) -> ModelSpec:
    """What evaluate and predict need to rebuild and feed the model."""
    scheme = scheme_for(params.prepare.target)
    recipe = recipe_of(params.prepare)
    return ModelSpec(
        arch=params.arch,
        encoder=params.encoder,
        classes=scheme.classes,
        target=scheme.target,
        image_size=recipe.image_size,
        hu_window=recipe.hu_window,
        image_dtype=recipe.image_dtype,
        labels=scheme.to_json(),
        folds=[fold],
        run_id=state.run_id,
        best_epoch=state.best_epoch,
        val_dice=state.best_dice if state.best_dice >= 0 else None,
    )


def build_parts(params: Params, classes: int, device: torch.device) -> Parts:
    """Model, optimizer and scheduler: the objects a checkpoint restores."""
    tp = params.train
    model = build_model(params.arch, params.encoder, tp.encoder_weights, classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if tp.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tp.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def end_of_epoch(
    state: State,
    row: EpochRow,
    params: Params,
    model: torch.nn.Module,
    *,
    checkpoint_dir: Path,
) -> bool:
    """Record the epoch, keep the best weights; True when early stopping says stop."""
    state.history = [*(state.history or []), row]
    state.epoch = row["epoch"]
    score = row["val_dice"] if row["val_dice"] is not None else -row["train_loss"]
    if state.best_epoch == 0 or score > state.best_dice:
        state.best_epoch, state.best_dice, state.bad_epochs = state.epoch, score, 0
        save_tensors(checkpoint_dir / BEST, model.state_dict())
    else:
        state.bad_epochs += 1
    patience = params.train.early_stopping_patience
    return patience is not None and state.bad_epochs >= patience


@dataclass
class Run:
    """Everything one training process works with."""

    params: Params
    paths: TrainPaths
    dist: Dist
    device: torch.device
    scheme: LabelScheme
    parts: Parts
    net: torch.nn.Module
    loader: DataLoader[Batch]
    loss_fn: SegmentationLoss
    val_cases: dict[str, dict[str, np.ndarray]]  # validation case -> its stored arrays
    state: State
    fp: str
    tracker: Tracker | None
    fold: int

    @property
    def module(self) -> torch.nn.Module:
        return self.parts["model"]


def setup(params: Params, paths: TrainPaths, fold: int) -> Run:
    """Data, model, optimizer, checkpoint state and tracking, ready for the first epoch."""
    splits = load_splits(paths.splits, fold)
    device = resolve_device(params.runtime.device)
    dist_info = init_distributed(device)
    seed_everything(params.train.seed)
    scheme = scheme_for(params.prepare.target)
    train_set = SliceDataset(
        store_paths(paths.data_dir, splits["train"]), params.train.augment, sided=scheme.multi
    )
    val_paths = store_paths(paths.data_dir, splits.get("val", []))
    val_cases = {p.stem: read_arrays(p) for p in val_paths} if dist_info.main else {}
    parts = build_parts(params, scheme.classes, device)
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(params, splits)
    state = load_checkpoint(paths.checkpoint_dir / LAST, parts, fp) or State()
    if state.epoch and dist_info.main:
        log.info("resuming after epoch %d of %d", state.epoch, params.train.epochs)
    if not val_paths and dist_info.main:
        log.info("no validation cases; the best epoch is the one with the lowest train loss")
    net = parts["model"]
    if dist_info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    loader = make_loader(train_set, params, dist_info, device)
    loss_fn = SegmentationLoss(params.train.loss, scheme.classes)
    tracker = None  # opened last: from here on, `train` closes it however the stage ends
    if dist_info.main:
        tracker = Tracker.start(params, run_id=state.run_id, stage="train", fold=fold)
    state.run_id = tracker.run_id if tracker else state.run_id
    return Run(
        params=params,
        paths=paths,
        dist=dist_info,
        device=device,
        scheme=scheme,
        parts=parts,
        net=net,
        loader=loader,
        loss_fn=loss_fn,
        val_cases=val_cases,
        state=state,
        fp=fp,
        tracker=tracker,
        fold=fold,
    )


def record_epoch(run: Run, epoch: int, train_loss: float, lr: float, *, start: float) -> bool:
    """Validate, checkpoint, log; True when early stopping says stop (main process only)."""
    if bad := non_finite_count(run.module.state_dict()):
        raise Diverged(f"{bad} weights became NaN or infinite in epoch {epoch}")
    val_loss: float | None = None
    dices: dict[str, float] = {}
    if run.val_cases:
        val_loss, dices = validate(
            run.module,
            run.val_cases,
            run.loss_fn,
            device=run.device,
            batch_size=run.params.runtime.eval_batch_size,
            bf16=run.params.train.bf16,
            infection_label=run.scheme.infection,
            threshold=run.params.evaluate.threshold,
        )
    row: EpochRow = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_dice": float(np.mean(list(dices.values()))) if dices else None,
        "lr": lr,
        "seconds": time.perf_counter() - start,
    }
    stop = end_of_epoch(
        run.state, row, run.params, run.module, checkpoint_dir=run.paths.checkpoint_dir
    )
    save_checkpoint(run.paths.checkpoint_dir / LAST, run.state, run.parts, run.fp)
    write_log(run.paths.log, run.state.history or [])
    if run.tracker:
        metrics = {c: row[c] for c in LOG_COLUMNS} | {f"val_dice.{c}": d for c, d in dices.items()}
        run.tracker.log_metrics(metrics, epoch)
    return stop


def check_explosion(run: Run, epoch: int, train_loss: float) -> None:
    """With `train.max_loss_factor`, an epoch loss that many times the lowest so far stops."""
    factor = run.params.train.max_loss_factor
    losses = [row["train_loss"] for row in run.state.history or []]
    if factor is not None and losses and train_loss > factor * min(losses):
        raise Diverged(
            f"the loss of epoch {epoch} ({train_loss:.4g}) is over "
            f"train.max_loss_factor={factor:g} times the lowest so far ({min(losses):.4g})"
        )


def one_epoch(run: Run, epoch: int) -> tuple[bool, float]:
    """Train, then (main process) record; returns (stop, slices per second)."""
    start = time.perf_counter()
    train_loss, seen = train_epoch(
        run.net,
        run.loader,
        run.loss_fn,
        run.parts["optimizer"],
        device=run.device,
        params=run.params,
        epoch=epoch,
        show=run.dist.main,
    )
    check_explosion(run, epoch, train_loss)
    lr = float(run.parts["scheduler"].get_last_lr()[0])  # a float (torch allows a tensor lr)
    run.parts["scheduler"].step()
    speed = seen * run.dist.world_size / (time.perf_counter() - start)
    stop = torch.zeros(1, device=run.device)  # nccl only carries device tensors
    if run.dist.main:
        stop[0] = float(record_epoch(run, epoch, train_loss, lr, start=start))
    if run.dist.world_size > 1:
        dist.broadcast(stop, src=0)
    return bool(stop.item()), speed


def train(params: Params, paths: TrainPaths, *, fold: int = 0) -> TrainSummary | None:
    """Train (or resume) one fold and write its model folder, metrics and per-epoch log; the
    summary in `metrics/train.json` (None on the other ranks of a DDP run)."""
    run = setup(params, paths, fold)
    try:
        summary = run_epochs(run)
    except BaseException as error:
        if run.tracker:  # never left RUNNING, however the stage stops
            run.tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        if isinstance(error, Diverged):
            raise what_is_kept(error, run.state, paths.checkpoint_dir) from None
        raise
    if run.tracker:
        run.tracker.end()
    if run.dist.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def run_epochs(run: Run) -> TrainSummary | None:
    """The remaining epochs, then (main process) the model folder and the summary."""
    speed = 0.0
    for epoch in range(run.state.epoch + 1, run.params.train.epochs + 1):
        stop, speed = one_epoch(run, epoch)
        if stop:
            break
    in_sync = ranks_in_sync(run.module, run.dist)
    if not run.dist.main:
        return None
    summary = finish(run, speed=speed, in_sync=in_sync)
    run.state.complete = True
    save_checkpoint(run.paths.checkpoint_dir / LAST, run.state, run.parts, run.fp)
    return summary


def best_weights(run: Run) -> dict[str, torch.Tensor]:
    """The best epoch's weights; damaged ones are set aside (with the checkpoint that relies
    on them, so that the next run trains the fold again) and are one line."""
    path = run.paths.checkpoint_dir / BEST
    if reason := best_weights_error(path, run.module):
        kept = drop_run(run.paths.checkpoint_dir)
        raise CovidSegError(
            f"{path}: {reason}; kept {kept}: run again to train fold {run.fold} from the start"
        )
    weights: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return weights


def finish(run: Run, *, speed: float, in_sync: bool) -> TrainSummary:
    """Export the best weights as the model folder and write `metrics/train.json`."""
    state, paths = run.state, run.paths
    save_model(paths.model_dir, best_weights(run), model_spec(run.params, state, run.fold))
    last = state.history[-1] if state.history else None
    summary: TrainSummary = {
        "fold": run.fold,
        "best_epoch": state.best_epoch,
        "best_val_dice": state.best_dice if last and last.get("val_dice") is not None else None,
        "epochs_run": state.epoch,
        "final_train_loss": last.get("train_loss") if last else None,
        "final_val_loss": last.get("val_loss") if last else None,
        "slices_per_s": round(speed, 3) if speed else None,
        "world_size": run.dist.world_size,
        "ranks_in_sync": in_sync,
    }
    write_json_atomic(paths.metrics, summary)
    if run.tracker:
        run.tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.tracker.log_artifact(paths.log, "training")
    return summary
