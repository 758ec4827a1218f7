"""Log the whole fold ensemble to MLflow as the `aggregate` stage does, and load it back as predict.

Writes `--folds` untrained fold model folders (`models/fold-<k>/`, by `save_model` with train's
own `model_spec`, `encoder_weights: null`: nothing is downloaded) at the default image size of
params, then calls `covidseg.evaluation.aggregate.track` (the stage's own code: the parent run, the
`FoldEnsemble` exported with torch.export, logged, registered and aliased) against a sqlite
store and artifact folder in a temporary folder. The model is then loaded back through
`load_predictor("models:/<name>@<alias>", "cpu")`, run on one slice and checked against the mean
probability of the fold models run one by one. Prints the sizes on disk, the wall times of
logging (with where it goes: reading the folds, the tracker's forward for the signature,
torch.export, writing the archive, MLflow's check of the input example, which loads the archive
and runs it once more) and of reloading, and the peak resident memory of the process.

The defaults are the study's model (UnetPlusPlus / densenet201, 5 folds at 512 px: about 1 GB of
weights, several minutes on two cores); `--quick` (Unet / resnet18, 64 px, 2 folds) is a smoke
check.

Usage: .venv/bin/python bench/ensemble_log.py [--quick] [--folds N] [--arch A] [--encoder E]
       [--size S]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import io
import os
import resource
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import load_note, machine_note, table, timed

import covidseg.evaluation.aggregate
from covidseg.config import Params, parse_params
from covidseg.evaluation.aggregate import AggregatePaths, CrossValidation, track
from covidseg.inference.ensemble import FoldEnsemble, load_ensemble
from covidseg.inference.predict import load_predictor
from covidseg.training.checkpoint import State
from covidseg.training.model import build_model
from covidseg.training.modelio import save_model
from covidseg.training.train import model_spec

CPU = torch.device("cpu")
MIB = 2**20


def bench_params(args: argparse.Namespace) -> Params:
    """The study's params with this model and these folds (the default image size unless
    `--size`); kfold so that any number of folds exists."""
    raw: dict = {
        "arch": args.arch,
        "encoder": args.encoder,
        "split": {"scheme": "kfold", "n_folds": max(args.folds, 2)},
    }
    raw["split"]["folds"] = list(range(args.folds))
    raw["tracking"] = {"promote": "always"}  # measured: logging the ensemble, not the choice
    if args.size:
        raw["prepare"] = {"image_size": args.size}
    return parse_params(raw)


def write_folds(params: Params, models: Path) -> None:
    """`models/fold-<k>/` as train's `finish` writes them: best weights, train's model spec."""
    classes = model_spec(params, State(), 0).classes
    for fold in params.split.folds:
        torch.manual_seed(fold)  # every fold a different network
        model = build_model(params.arch, params.encoder, None, classes)
        state = State(run_id=f"bench-run-{fold}", best_epoch=1, best_dice=0.5)
        save_model(models / f"fold-{fold}", model.state_dict(), model_spec(params, state, fold))
        del model
        log = models.parent / "folds" / "logs" / f"fold-{fold}.csv"  # a run that did not diverge
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("epoch,train_loss,val_loss,val_dice\n1,0.9,0.8,0.5\n")


def du(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mib() -> int:
    """Peak resident memory (MiB) of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@contextlib.contextmanager
def tee_stderr() -> Iterator[io.StringIO]:
    """Copy what is written to stderr (the tracker's one warning line) while still showing it."""
    seen = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            seen.write(text)
            return sys.__stderr__.write(text) if sys.__stderr__ else len(text)

    with contextlib.redirect_stderr(Tee()):
        yield seen


class Phases:
    """Wall seconds and calls of the library functions that logging goes through, wrapped in
    place (nothing reimplemented). A call made inside another watched call (the forward that
    torch.export traces, deepcopy's recursion) counts as the outer one's time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.rss: dict[str, int] = {}  # peak RSS (MiB) of the process when it returned
        self.busy = False
        self.undo: list[tuple[Any, str, Any]] = []

    def wrap(
        self, owner: Any, attr: str, label: str, when: Callable[..., bool] = lambda *a: True
    ) -> None:
        """Time the calls of `owner.attr` for which `when(*args)` holds under `label`."""
        original = getattr(owner, attr, None)
        if original is None:  # e.g. MLflow renamed it: not timed on its own
            return

        @functools.wraps(original)
        def watched(*args: Any, **kwargs: Any) -> Any:
            if self.busy or not when(*args):
                return original(*args, **kwargs)
            self.busy = True
            try:
                seconds, result = timed(lambda: original(*args, **kwargs))
            finally:
                self.busy = False
            self.seconds[label] = self.seconds.get(label, 0.0) + seconds
            self.calls[label] = self.calls.get(label, 0) + 1
            self.rss[label] = peak_rss_mib()
            return result

        self.undo.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, watched)

    def restore(self) -> None:
        for owner, attr, before in reversed(self.undo):
            if before is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, before)
        self.undo.clear()

    def rows(self, total: float) -> list[list[object]]:
        """One row a phase (seconds, the peak RSS when it ended), and the unwatched rest."""
        rows: list[list[object]] = [
            [f"- {label}, {self.calls[label]} call(s) (s)", f"{seconds:.1f}", self.rss[label]]
            for label, seconds in self.seconds.items()
        ]
        rest = total - sum(self.seconds.values())
        what = "- the rest: MLflow import, sqlite store, artifact copy, registry (s)"
        return [*rows, [what, f"{rest:.1f}", ""]]


def watch_logging() -> Phases:
    """Wrap what `track` goes through: reading the folds, the tracker's copy of the ensemble
    and its forward for the signature, torch.export and its archive, MLflow's check that the
    input example serves (it loads the archive and runs it)."""
    phases = Phases()
    phases.wrap(covidseg.evaluation.aggregate, "load_ensemble", "read the fold folders")
    is_module = lambda x, *_: isinstance(x, torch.nn.Module)  # noqa: E731
    phases.wrap(copy, "deepcopy", "copy of the ensemble", is_module)
    phases.wrap(FoldEnsemble, "__call__", "forward for the signature")
    phases.wrap(torch.export, "export", "torch.export.export")
    phases.wrap(torch.export, "save", "torch.export.save (model.pt2)")
    utils = importlib.import_module("mlflow.models.utils")
    phases.wrap(utils, "_validate_serving_input", "MLflow input-example check (load + forward)")
    return phases


def big_files(folder: Path, at_least: int = MIB) -> list[list[object]]:
    """A row for each file of `folder` of at least `at_least` bytes (MiB)."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size >= at_least)
    return [
        [f"  {p.relative_to(folder)} (MiB)", f"{p.stat().st_size / MIB:.1f}", ""] for p in found
    ]


def probabilities(logits: torch.Tensor, classes: int) -> np.ndarray:
    """Per-class probabilities of an output (sigmoid for one map, softmax for several)."""
    out = torch.sigmoid(logits) if classes == 1 else torch.softmax(logits, dim=1)
    return out.float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="fold models in the ensemble")
    parser.add_argument("--arch", default="UnetPlusPlus")
    parser.add_argument("--encoder", default="densenet201")
    parser.add_argument("--size", type=int, default=None, help="image size (default: params')")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: Unet(resnet18), 64 px, 2 folds"
    )
    args = parser.parse_args()
    if args.quick:
        args.arch, args.encoder, args.size, args.folds = "Unet", "resnet18", 64, 2
    start_note = machine_note()
    torch.set_num_threads(os.cpu_count() or 1)
    params = bench_params(args)
    name, alias = params.tracking.registered_model, params.tracking.alias
    size = params.prepare.image_size
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        root = Path(tmp)
        models = root / "models"
        write_folds(params, models)
        # the store and its artifacts in tmp: the tracker's root is the working folder
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)
        paths = AggregatePaths(
            folds_dir=root / "folds",
            models_dir=models,
            metrics=root / "evaluate.json",  # absent: track logs only the model
            per_case=root / "per_case.csv",
            per_fold=root / "per_fold.csv",
            report_dir=root / "benchmark",
        )
        summary = CrossValidation(keys=(), overall={"n_cases": 0}, folds={})
        rss_before = peak_rss_mib()
        phases = watch_logging()
        with tee_stderr() as warnings:
            log_s, _ = timed(lambda: track(params, paths, summary, []))
        phases.restore()  # the comparison below runs unwatched
        if "MLflow tracking failed" in warnings.getvalue():
            raise SystemExit("logging the ensemble failed (the warning above)")
        rss_logged = peak_rss_mib()
        logged = root / "mlartifacts"
        model_dirs = [p.parent for p in logged.rglob("MLmodel")]
        uri = f"models:/{name}@{alias}"
        reload_s, predictor = timed(lambda: load_predictor(uri, "cpu"))
        rss_reloaded = peak_rss_mib()
        image = np.random.default_rng(0).random((1, 1, size, size), dtype=np.float32)
        with torch.no_grad():
            forward_s, out = timed(lambda: predictor.model(torch.from_numpy(image)))
            together = probabilities(out, predictor.spec.classes)
            ensemble, _ = load_ensemble(models, CPU)
            apart = [
                probabilities(m(torch.from_numpy(image)), predictor.spec.classes)
                for m in ensemble.members
            ]
        del ensemble
        mean = np.mean(apart, axis=0)
        diff = float(np.abs(together - mean).max())
        spread = float(np.abs(apart[0] - apart[-1]).max()) if len(apart) > 1 else 0.0
        mib = lambda path: f"{du(path) / MIB:.1f}"  # noqa: E731
        artifact_rows: list[list[object]] = []
        for folder in model_dirs:  # the logged model's folder, its files of 1 MiB or more
            artifact_rows += [[f"- {folder.relative_to(logged)} (MiB)", mib(folder), ""]]
            artifact_rows += big_files(folder)
        rows: list[list[object]] = [
            [f"{args.folds} fold folders on disk (MiB)", mib(models), ""],
            ["one fold folder (MiB)", mib(models / "fold-0"), ""],
            ["logged artifacts, all (MiB)", mib(logged), ""],
            *artifact_rows,
            ["before logging: imports, writing the folds", "", rss_before],
            ["log + register + alias: aggregate's track() (s)", f"{log_s:.1f}", rss_logged],
            *phases.rows(log_s),
            [f"reload: load_predictor({uri!r}) (s)", f"{reload_s:.1f}", rss_reloaded],
            [f"one forward of the reloaded model, 1 x {size} px (s)", f"{forward_s:.1f}", ""],
            ["the whole process", "", peak_rss_mib()],
        ]
    print(start_note)
    print(f"{args.folds} x {args.arch}({args.encoder}), {size} px, untrained, CPU")
    print(table(["what", "value", "peak RSS so far (MiB)"], rows))
    print(
        f"reloaded output vs mean probability of the {args.folds} folds: max |diff| {diff:.2e} "
        f"(folds differ from each other by up to {spread:.2e})"
    )
    print(load_note())
    if diff > 1e-5:
        raise SystemExit(f"the reloaded ensemble is not the fold mean (max |diff| {diff:.2e})")


if __name__ == "__main__":
    main()
