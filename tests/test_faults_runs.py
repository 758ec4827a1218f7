"""What happens when a training, evaluation or tracking run goes wrong: one test per fault,
named for it (the faults of `predict` and of the data are in test_faults.py).

Each fault ends in one clear line (no traceback), leaves no half-written output and no MLflow
run RUNNING, and never stops a rerun from finishing.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mirror_server import MirrorServer
from stage_paths import train_paths
from tiny import TINY, merge

from covidseg import CovidSegError
from covidseg.atomic import atomic_dir, write_json_atomic
from covidseg.config import DownloadParams, Params, parse_params
from covidseg.training.train import train

ROOT = Path(__file__).resolve().parents[1]
ONE_EPOCH = merge(TINY, {"train": {"epochs": 1}})
DISK_FULL = f"not written ({os.strerror(errno.ENOSPC)}); free some space and run again"


def statuses(db: Path) -> list[tuple[str, str]]:
    """Every MLflow run of the test's store: (name, status), sorted."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted((r.info.run_name, r.info.status) for r in client.search_runs(experiments))


def everything_in(folder: Path) -> list[str]:
    """Every name under `folder`, hidden ones included, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(folder / "model.pt", weights_only=True)
    return loaded


# --- checkpoints --------------------------------------------------------------------------------


def test_a_damaged_best_pt_left_by_a_killed_run_is_set_aside_and_the_fold_retrained(
    prepared: tuple[Path, Path], tmp_path: Path, tracked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = parse_params(ONE_EPOCH)
    paths = train_paths(tmp_path, prepared)
    train(params, paths)
    first = weights(paths.model_dir)
    last = paths.checkpoint_dir / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["state"]["complete"] = False  # killed after its last epoch, before it could say so
    torch.save(payload, last)
    (paths.checkpoint_dir / "best.pt").write_bytes(b"PK\x03\x04 half a zip")
    shutil.rmtree(paths.model_dir)
    capsys.readouterr()

    summary = train(params, paths)  # until now: a traceback at the end, on every rerun
    err = capsys.readouterr().err
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: {paths.checkpoint_dir / 'best.pt'}: RuntimeError: ")
    assert warning.endswith(", training the fold from the start")
    assert "resuming" not in err and "Traceback" not in err
    aside = sorted(p.name.split(".corrupt-")[0] for p in paths.checkpoint_dir.glob("*.corrupt-*"))
    assert aside == ["best.pt", "last.pt"]
    assert summary is not None and summary["epochs_run"] == 1
    again = weights(paths.model_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)  # trained from the start again


def test_best_pt_damaged_during_a_run_is_one_line_and_the_next_run_retrains(
    prepared: tuple[Path, Path], tmp_path: Path, tracked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import covidseg.training.train as training

    params = parse_params(ONE_EPOCH)
    paths = train_paths(tmp_path, prepared)
    real_save = training.save_tensors

    def damaged(path: Path, payload: object) -> None:
        real_save(path, payload)
        if path.name == "best.pt":  # cut short, as a failing disk may leave it
            path.write_bytes(path.read_bytes()[:1000])

    monkeypatch.setattr(training, "save_tensors", damaged)
    with pytest.raises(CovidSegError) as caught:
        train(params, paths)
    message = str(caught.value)
    assert message.startswith(f"{paths.checkpoint_dir / 'best.pt'}: RuntimeError: ")
    assert " and last.pt.corrupt-" in message
    assert message.endswith(": run again to train fold 0 from the start")
    assert not paths.model_dir.exists()
    assert [status for _, status in statuses(tracked)] == ["FAILED", "FAILED"]  # fold and CV

    monkeypatch.setattr(training, "save_tensors", real_save)
    summary = train(params, paths)
    assert summary is not None and summary["epochs_run"] == 1
    assert (paths.model_dir / "model.pt").is_file()


# --- params -------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["train", "split"])
def test_a_negative_seed_is_one_params_line_at_start_up(section: str) -> None:
    with pytest.raises(CovidSegError) as caught:
        parse_params({section: {"seed": -1}}, "params.yaml")
    assert str(caught.value) == (
        f"params.yaml: {section}.seed: Input should be greater than or equal to 0"
    )


def test_a_negative_seed_stops_the_stage_with_exit_1_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"seed": -3}}))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "prepare.py"),
            *("--raw", "raw", "--out", "out"),
            *("--splits", "splits.json"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: params.yaml: split.seed: Input should be greater than or equal to 0"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("raw", [{"train": {"device": "cuda"}}, {"train.device": "cuda"}])
def test_train_device_says_it_moved_to_runtime_device(raw: dict[str, Any]) -> None:
    with pytest.raises(CovidSegError) as caught:
        parse_params(raw, "params.yaml")
    assert str(caught.value) == "params.yaml: train.device: moved to runtime.device"


def test_a_key_of_another_section_says_where_it_lives() -> None:
    with pytest.raises(CovidSegError) as caught:
        parse_params({"train": {"eval_batch_size": 4}, "evaluate.threshold": 0.4}, "p.yaml")
    assert str(caught.value) == (
        "p.yaml: train.eval_batch_size: unknown key (did you mean runtime.eval_batch_size?); "
        "evaluate.threshold: unknown key (params.yaml nests sections: `train:`, then `lr:` "
        "indented below)"
    )


# --- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_naming_it_and_writes_nothing(
    prepared: tuple[Path, Path], tmp_path: Path, tracked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def full_disk(payload: object, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(payload, buffer)
        f.write(buffer.getvalue()[:4096])  # half of it reaches the disk...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...then it is full

    monkeypatch.setattr(torch, "save", full_disk)
    paths = train_paths(tmp_path, prepared)
    with pytest.raises(CovidSegError) as caught:
        train(parse_params(ONE_EPOCH), paths)
    assert str(caught.value) == f"{paths.checkpoint_dir / 'best.pt'}: {DISK_FULL}"
    assert everything_in(paths.checkpoint_dir) == []  # no half checkpoint, no temporary
    assert not paths.model_dir.exists() and not paths.metrics.exists()
    assert [status for _, status in statuses(tracked)] == ["FAILED", "FAILED"]


def test_a_full_disk_while_writing_evaluate_reports_is_one_line_and_keeps_the_old_reports(
    prepared: tuple[Path, Path],
    shared_raw_dir: Path,
    tmp_path: Path,
    tracked: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from covidseg.evaluation.evaluate import EvalPaths, evaluate
    from covidseg.training.model import build_model
    from covidseg.training.modelio import ModelSpec, save_model

    torch.manual_seed(0)
    spec = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 64, (-1250.0, 250.0))
    save_model(tmp_path / "model", build_model("Unet", "mobilenet_v2", None, 1).state_dict(), spec)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "old.png").write_text("the last complete reports")
    paths = EvalPaths(
        data_dir=prepared[0],
        raw_dir=shared_raw_dir,
        splits=prepared[1],
        model_dir=tmp_path / "model",
        metrics=tmp_path / "evaluate.json",
        per_case=tmp_path / "per_case.csv",
        reports=reports,
    )

    def full_disk(self: FigureCanvasAgg, target: Any, *args: Any, **kwargs: Any) -> None:
        target.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FigureCanvasAgg, "print_png", full_disk)
    with pytest.raises(CovidSegError) as caught:
        evaluate(parse_params(ONE_EPOCH), paths, fold=0)
    message = str(caught.value)
    assert message.startswith(f"{reports / 'overlays'}/") and ".tmp-" not in message
    assert message.endswith(f".png: {DISK_FULL}")
    assert everything_in(reports) == ["old.png"]
    assert not paths.metrics.exists() and not paths.per_case.exists()


def test_a_full_disk_while_writing_a_metrics_file_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "evaluate.json"
    target.write_text("{}\n")

    def full_disk(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        with self.open("w") as f:
            f.write(text[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CovidSegError) as caught:
        write_json_atomic(target, {"dice": 0.5})
    assert str(caught.value) == f"{target}: {DISK_FULL}"
    assert everything_in(tmp_path) == ["evaluate.json"] and target.read_text() == "{}\n"


# --- divergence and stops: no MLflow run stays RUNNING ------------------------------------------


def test_a_divergence_before_any_epoch_says_no_model_is_kept_and_ends_its_runs_failed(
    prepared: tuple[Path, Path], tmp_path: Path, tracked: Path
) -> None:
    paths = train_paths(tmp_path, prepared)
    with pytest.raises(CovidSegError) as caught:
        train(parse_params(merge(TINY, {"train": {"lr": 1e8}})), paths)
    message = str(caught.value)
    assert message.startswith("training diverged: ") and "epoch 1" in message
    assert message.endswith("; no epoch finished, so there is no model to keep (lower train.lr)")
    assert statuses(tracked) == [
        ("Unet-mobilenet_v2", "FAILED"),  # the cross-validation's parent run too
        ("Unet-mobilenet_v2 fold 0", "FAILED"),
    ]


def test_ctrl_c_during_training_ends_its_runs_killed_and_a_rerun_reopens_them(
    prepared: tuple[Path, Path], tmp_path: Path, tracked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import covidseg.training.train as training

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    real_check = training.check_interrupt
    monkeypatch.setattr(training, "check_interrupt", ctrl_c)
    paths = train_paths(tmp_path, prepared)
    with pytest.raises(KeyboardInterrupt):
        train(parse_params(ONE_EPOCH), paths)
    assert statuses(tracked) == [
        ("Unet-mobilenet_v2", "KILLED"),
        ("Unet-mobilenet_v2 fold 0", "KILLED"),
    ]

    monkeypatch.setattr(training, "check_interrupt", real_check)
    train(parse_params(ONE_EPOCH), paths)
    assert statuses(tracked) == [
        ("Unet-mobilenet_v2", "RUNNING"),  # the cross-validation goes on, until `aggregate`
        ("Unet-mobilenet_v2 fold 0", "FINISHED"),  # a new run: no epoch had been saved
        ("Unet-mobilenet_v2 fold 0", "KILLED"),
    ]


def test_a_failing_aggregate_ends_its_cross_validation_run_failed(
    tmp_path: Path, tracked: Path
) -> None:
    from covidseg.evaluation.aggregate import AggregatePaths, aggregate

    folds = tmp_path / "metrics" / "folds"
    (folds / "0").mkdir(parents=True)
    (folds / "0" / "per_case.csv").write_text("case,dice,nsd,hd95\na,0.5,0.5,3\n")
    (folds / "logs").mkdir()
    (folds / "logs" / "fold-0.csv").write_text("epoch,val_loss,val_dice\n1,0.5,0.4\n")
    paths = AggregatePaths(
        folds_dir=folds,
        models_dir=tmp_path / "models",  # no fold model: the ensemble cannot be loaded
        metrics=tmp_path / "evaluate.json",
        per_case=tmp_path / "per_case.csv",
        per_fold=tmp_path / "per_fold.csv",
        report_dir=tmp_path / "benchmark",
    )
    with pytest.raises(CovidSegError):
        aggregate(parse_params(TINY), paths)
    assert statuses(tracked) == [("Unet-mobilenet_v2", "FAILED")]


# --- credentials --------------------------------------------------------------------------------


def test_credentials_in_the_mirror_url_never_reach_a_message(
    http_mirror: MirrorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from covidseg.data.download import fetch_archives

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    missing = {"Missing.zip": "0" * 64}
    for url, error in (
        (f"http://user:s3cret@127.0.0.1:{closed}/files", "cannot reach http://***@127.0.0.1"),
        (http_mirror.url.replace("://", "://user:s3cret@"), "not found (HTTP 404)"),
    ):
        params = DownloadParams(base_url=url, sha256=missing, retries=1, backoff_s=0)
        with pytest.raises(CovidSegError) as caught:
            fetch_archives(params, cache_dir=tmp_path / "cache", raw_dir=tmp_path / "raw")
        shown = str(caught.value) + capsys.readouterr().err
        assert error in shown and "://***@127.0.0.1" in shown
        assert "s3cret" not in shown and "user:" not in shown


def test_credentials_in_the_mirror_url_are_not_logged_as_mlflow_params(tracked: Path) -> None:
    from mlflow import MlflowClient

    from covidseg.tracking import Tracker

    params = Params.model_validate(
        {"download": {"base_url": "https://user:s3cret@mirror.example.org/files"}}
    )
    with Tracker.start(params, stage="train", root=tracked.parent) as tracker:
        pass
    assert tracker.run_id is not None
    logged = MlflowClient(f"sqlite:///{tracked}").get_run(tracker.run_id).data.params
    assert logged["download.base_url"] == "https://***@mirror.example.org/files"
    assert not [k for k, v in logged.items() if "s3cret" in v]


# --- a killed run's leftovers -------------------------------------------------------------------


def killed_folder_writer(cwd: Path, folder: str) -> None:
    """A writer of `folder` killed (SIGKILL: nothing cleans up) half-way through."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from covidseg.atomic import atomic_dir
        with atomic_dir(Path({folder!r})) as tmp:
            (tmp / "half.h5").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env)
    assert done.returncode == -signal.SIGKILL


def test_a_killed_folder_writer_leaves_its_temporary_inside_the_output_not_beside_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "a.h5").write_text("old")
    killed_folder_writer(tmp_path, "data/prepared")
    left = everything_in(tmp_path / "data")
    assert left[0] == "prepared" and left[-1] == "prepared/a.h5"  # nothing beside the output:
    assert len(left) == 4 and left[1].startswith("prepared/.tmp-")  # DVC's restore clears it
    with atomic_dir(tmp_path / "data" / "prepared") as tmp:
        (tmp / "b.h5").write_text("new")
    assert everything_in(tmp_path / "data") == ["prepared", "prepared/b.h5"]


@pytest.mark.slow
def test_a_cache_hit_dvc_repro_removes_a_killed_runs_leftovers(tmp_path: Path) -> None:
    from pipeline_repo import dvc, run

    write = (
        "from pathlib import Path; from covidseg.atomic import atomic_dir\n"
        "with atomic_dir(Path('out')) as tmp:\n"
        "    (tmp / 'a.txt').write_text(Path('v.txt').read_text())\n"
        "with open('runs.log', 'a') as f: f.write('ran\\n')\n"
    )
    (tmp_path / "write.py").write_text(write)
    stage = {"cmd": f"PYTHONPATH={ROOT} python write.py", "deps": ["v.txt"], "outs": ["out"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    (tmp_path / "v.txt").write_text("1")
    run(tmp_path, "git", "init", "-q")
    dvc(tmp_path, "init", "-q")
    for version in ("1", "2", "1"):
        (tmp_path / "v.txt").write_text(version)
        if version == "1" and (tmp_path / "out").exists():
            killed_folder_writer(tmp_path, "out")  # a run of version 1 killed half-way
        done = dvc(tmp_path, "repro")
    assert "is cached - skipping run, checking out outputs" in done.stdout
    assert (tmp_path / "runs.log").read_text() == "ran\nran\n"  # restored, not run
    assert everything_in(tmp_path / "out") == ["a.txt"]  # the killed run's temporary is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
