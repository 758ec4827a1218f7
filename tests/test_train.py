"""Training: sampling, augmentation, repeatability, resume bookkeeping, DDP on 2 CPU processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import yaml
from tiny import TINY, merge

from covidseg import CovidSegError
from covidseg.config import AugmentParams, parse_params
from covidseg.training.augment import augment_slice
from covidseg.training.dataset import BalancedSampler, SliceDataset, sampling_weights
from covidseg.training.model import build_model, check_model_names
from covidseg.training.train import TrainPaths, fingerprint, train

ROOT = Path(__file__).resolve().parents[1]


def paths(tmp_path: Path, prepared: tuple[Path, Path], name: str) -> TrainPaths:
    out = tmp_path / name
    return TrainPaths(
        prepared[0], prepared[1], out / "model", out / "ckpt", out / "train.json", out / "log.csv"
    )


def read_log(path: Path) -> list[list[str]]:
    """The per-epoch log without its last column (seconds)."""
    return [line.split(",")[:-1] for line in path.read_text().splitlines()[1:]]


def test_sampler_gives_infected_slices_their_share() -> None:
    positive = np.array([True] * 10 + [False] * 90)
    weights = sampling_weights(positive, 0.5)
    assert weights.sum() == pytest.approx(1.0)
    draws = [i for i, _ in BalancedSampler(positive, 0.5, 4000, seed=0)]
    assert np.mean(positive[draws]) == pytest.approx(0.5, abs=0.03)


def test_sampler_is_a_function_of_seed_and_epoch_and_splits_ranks() -> None:
    positive = np.array([True, False] * 20)
    a = BalancedSampler(positive, 0.5, 10, seed=1)
    a.set_epoch(3)
    b = BalancedSampler(positive, 0.5, 10, seed=1)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    ranks = [list(BalancedSampler(positive, 0.5, 5, 1, rank=r, world_size=2)) for r in (0, 1)]
    single = BalancedSampler(positive, 0.5, 10, 1)
    assert [x for pair in zip(*ranks, strict=True) for x in pair] == list(single)


def test_augmentation_moves_image_and_mask_together() -> None:
    image = np.zeros((64, 64), np.float32)
    image[10:20, 40:50] = 1.0
    mask = (image > 0.5).astype(np.uint8)
    params = AugmentParams(intensity=0.0)
    for seed in range(5):
        out, out_mask = augment_slice(image, mask, params, np.random.default_rng(seed))
        assert set(np.unique(out_mask)) <= {0, 1}
        assert np.mean(out[out_mask == 1]) > 0.8  # the lesion pixels still carry the lesion
        again = augment_slice(image, mask, params, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[1], out_mask)


def test_dataset_reads_single_slices_lazily(prepared) -> None:
    stores = sorted(prepared[0].glob("*.h5"))
    data = SliceDataset(stores)
    image, mask = data[(0, 0)]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.uint8
    assert data.positive.any() and not data.positive.all()
    assert not data._files or all(f.id.valid for f in data._files.values())
    import pickle

    assert pickle.loads(pickle.dumps(data))._files == {}  # handles never cross processes


def test_unknown_model_names_are_clear_errors() -> None:
    with pytest.raises(CovidSegError, match="unknown architecture 'UNetXX'"):
        check_model_names("UNetXX", "resnet18")
    with pytest.raises(CovidSegError, match="unknown encoder 'resnet999'"):
        check_model_names("Unet", "resnet999")
    model = build_model("UnetPlusPlus", "mobilenet_v2", None, 4)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_training_is_repeatable_and_resume_skips_finished_epochs(
    prepared, tmp_path, tracked, capsys
) -> None:
    params = parse_params(TINY)
    first = train(params, paths(tmp_path, prepared, "a"))
    second = train(params, paths(tmp_path, prepared, "b"))
    assert first is not None and second is not None  # the main rank's summaries
    assert first["final_train_loss"] == second["final_train_loss"]
    log_a, log_b = (read_log(tmp_path / name / "log.csv") for name in ("a", "b"))
    assert log_a == log_b and len(log_a) == 2  # every column but the wall-clock seconds
    spec = json.loads((tmp_path / "a" / "model" / "model.json").read_text())
    assert spec["encoder"] == "mobilenet_v2" and spec["image_size"] == 64 and spec["run_id"]
    capsys.readouterr()
    again = train(params, paths(tmp_path, prepared, "a"))  # a rerun of a finished stage
    assert "holds a finished run; starting afresh" in capsys.readouterr().err
    assert again is not None
    assert again["final_train_loss"] == first["final_train_loss"]  # and retrains the same
    changed = parse_params(merge(TINY, {"train": {"lr": 0.01}}))
    split = json.loads(prepared[1].read_text())["0"]
    assert fingerprint(changed, split) != fingerprint(params, split)
    more_folds = parse_params(merge(TINY, {"split": {"folds": [0, 1, 2]}}))
    fewer_folds = parse_params(merge(TINY, {"split": {"folds": [0]}}))
    assert fingerprint(more_folds, split) == fingerprint(fewer_folds, split)
    other = {**split, "train": split["val"], "val": split["train"]}
    assert fingerprint(params, other) != fingerprint(params, split)


def test_changing_runtime_settings_resumes_the_checkpoint(
    prepared, tmp_path, tracked, monkeypatch, capsys
) -> None:
    import covidseg.training.train as training

    params = parse_params(TINY)
    train(params, paths(tmp_path, prepared, "whole"))
    real_one_epoch = training.one_epoch

    def stop_in_epoch_two(run, epoch):  # a Ctrl-C during the second epoch
        if epoch == 2:
            raise KeyboardInterrupt
        return real_one_epoch(run, epoch)

    monkeypatch.setattr(training, "one_epoch", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(params, paths(tmp_path, prepared, "cut"))
    monkeypatch.setattr(training, "one_epoch", real_one_epoch)
    capsys.readouterr()
    other_runtime = parse_params(merge(TINY, {"runtime": {"num_workers": 1, "eval_batch_size": 3}}))
    assert fingerprint(other_runtime, {}) == fingerprint(params, {})
    train(other_runtime, paths(tmp_path, prepared, "cut"))
    assert "note: resuming after epoch 1 of 2" in capsys.readouterr().err
    whole, cut = (read_log(tmp_path / name / "log.csv") for name in ("whole", "cut"))
    assert cut == whole  # same losses and Dice, with another worker count and batch size


def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(prepared, tmp_path, empty_mlflow_db) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(merge(TINY, {"train": {"epochs": 1}})))
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")  # a fresh store, tables made
    out = paths(tmp_path, prepared, "ddp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(ROOT / "stages" / "train.py"),
        "--data",
        str(out.data_dir),
        "--splits",
        str(out.splits),
        "--model",
        str(out.model_dir),
        "--checkpoints",
        str(out.checkpoint_dir),
        "--metrics",
        str(out.metrics),
        "--epoch-log",
        str(out.log),
        "--params",
        str(params_file),
    ]
    env = {
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.metrics.read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert (out.model_dir / "model.pt").exists()


def test_imagenet_weights_offline_is_one_clear_line(monkeypatch) -> None:
    import huggingface_hub.constants

    # what a machine without network amounts to, without ~24 s of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CovidSegError) as error:
        build_model("Unet", "resnet18", "imagenet", 1)
    message = str(error.value)
    assert "train.encoder_weights" in message and "null" in message and "\n" not in message


def test_early_stopping_counts_epochs_without_improvement(tmp_path) -> None:
    from covidseg.training.checkpoint import EpochRow, State
    from covidseg.training.train import end_of_epoch

    params = parse_params({"train": {"early_stopping_patience": 2}})
    model = torch.nn.Conv2d(1, 1, 1)
    state = State()
    dices = [0.1, 0.3, 0.2, 0.25, 0.5]
    stops = [
        end_of_epoch(
            state,
            cast(EpochRow, {"epoch": e, "train_loss": 1.0, "val_dice": d}),  # what it reads
            params,
            model,
            checkpoint_dir=tmp_path,
        )
        for e, d in enumerate(dices, start=1)
    ]
    assert stops == [False, False, False, True, False]  # epochs 3 and 4 did not beat 0.3
    assert (state.best_epoch, state.best_dice) == (5, 0.5)
    assert (tmp_path / "best.pt").exists()


def test_mirroring_swaps_lung_sides_only_for_sided_labels() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :3], mask[:, 5:], mask[4, 4] = 2, 1, 3  # right lung on the left of the image
    image = mask.astype(np.float32) / 3
    params = AugmentParams(rotate_deg=0, scale=0, intensity=0)
    seed = next(s for s in range(50) if np.random.default_rng(s).random() < 0.5)  # flips
    _, sided = augment_slice(image, mask, params, np.random.default_rng(seed), sided=True)
    _, plain = augment_slice(image, mask, params, np.random.default_rng(seed))
    # the mirrored left lung now lies where a right lung lies, and is labelled right (2)
    assert (sided[:, :3] == 2).all() and (sided[:, 5:] == 1).all() and sided[4, 3] == 3
    np.testing.assert_array_equal(plain, mask[:, ::-1])
