"""Shared fixtures: synthetic cases, a folder mirror of the archives, a loopback HTTP mirror,
extracted and prepared phantoms, small model folders and fitted networks, an MLflow store, a
reproduced cross-validation repository.

What is expensive and only read is built once per session (under `tmp_path_factory`): the
mirror, the extracted archives, the prepared stores of each configuration, the model folder,
the fitted networks, an empty MLflow database and a tiny CV run through `dvc repro`. No test
may write into them: a test that changes its inputs takes a fixture that copies them into its
own `tmp_path` (`raw_dir`, `pipeline_repo.copy_repo`) or builds its own (`tracked`: a copy of
the empty database). Under pytest-xdist each worker builds what its tests use; the tests that
share the CV repository wait for the one worker that builds it (`cv_repo`).
"""

from __future__ import annotations

import os

# Two cores and `-n 2`: a worker's torch (and every stage process it starts) using both cores
# makes OpenMP threads spin against the other worker's: a tiny CV run by both workers at once
# took 144 s with two threads each and 92 s with one. So each worker gets its share of the cores,
# set in the worker before numpy or torch is imported; a thread count set by the caller wins.
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from mirror_server import Mirror, MirrorServer
from phantoms import PhantomCase, default_cases, write_archives
from pipeline_repo import CvRepo, cv_params

if TYPE_CHECKING:
    import torch

    from covidseg.config import PrepareParams

pytest_plugins = ["cpu_durations"]  # --cpu-durations=N

SIZE = 64  # the prepared phantoms' image size


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the single tests that use `cv_repo`, then the other slow ones, then the
    rest (a stable sort: the order within each stays). pytest-xdist hands out the `xdist_group`
    chains first and then single tests in this order, so the CV repository is built early by
    a free worker (not late, on the Slurm chain that needs it last) and no long test is left
    for the end."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("xdist_group"):
            return 2  # a chain of its own: its order is its module's
        if "cv_repo" in getattr(item, "fixturenames", ()):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def xdist_groups_hold(request: pytest.FixtureRequest) -> None:
    """Under `--dist loadgroup`, fail at once if pytest-xdist lost the `xdist_group` marks:
    with some pytest releases it silently spreads a group over the workers (pytest-xdist
    issue 1386), and every worker would build the group's servers and CV repositories."""
    if not getattr(request.config.option, "loadgroup", False):
        return
    items = request.session.items
    grouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group")]
    lost = [nodeid for nodeid in grouped if nodeid.rfind("@") <= nodeid.rfind("]")]
    if lost:
        pytest.fail(
            f"pytest-xdist ignores xdist_group under pytest {pytest.__version__} ({lost[0]} "
            "has no group suffix); install the pytest pinned in requirements-dev.txt",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def messages_as_the_command_line_shows_them() -> None:
    """The package's log lines on stderr (`error: ...`), as the stage runner and the CLI set
    them up, also for library calls made in-process by tests."""
    from covidseg.log import configure

    configure()


@pytest.fixture(scope="session")
def phantom_cases() -> list[PhantomCase]:
    """The three default phantoms (read-only arrays, so sharing them is safe)."""
    return default_cases()


# --- archives -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory, phantom_cases: list[PhantomCase]) -> Mirror:
    """A folder with the four archives written from `phantom_cases`, once per session.

    Read-only: tests fetch from it; one that needs a damaged archive writes a copy of the
    mirror of its own (`test_download.bad_mirror`)."""
    folder = tmp_path_factory.mktemp("mirror")
    return Mirror(dir=folder, sha256=write_archives(phantom_cases, folder), cases=phantom_cases)


@pytest.fixture
def mirror_dir(mirror: Mirror) -> Path:
    return mirror.dir


@pytest.fixture
def http_mirror(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> Iterator[MirrorServer]:
    """A loopback HTTP server over `mirror.dir`, one per test (its failure injection and its
    log of requests are the test's own); see `mirror_server`."""
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(variable, "127.0.0.1,localhost")
    server = MirrorServer(mirror.dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_raw_dir(tmp_path_factory: pytest.TempPathFactory, mirror: Mirror) -> Path:
    """The phantom archives extracted by the real download code from the folder mirror, once
    per session. Read-only: a test takes `raw_dir` (its own copy) instead."""
    from covidseg.config import DownloadParams
    from covidseg.data.download import fetch_archives

    root = tmp_path_factory.mktemp("raw")
    params = DownloadParams(base_url=str(mirror.dir), sha256=mirror.sha256)
    fetch_archives(params, cache_dir=root / "downloads", raw_dir=root / "raw")
    return root / "raw"


@pytest.fixture
def raw_dir(shared_raw_dir: Path, tmp_path: Path) -> Path:
    """The extracted phantom archives in the test's own folder (`tmp_path / "raw"`): the test
    may damage or add files."""
    return Path(shutil.copytree(shared_raw_dir, tmp_path / "raw"))


# --- prepared stores ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_raw_dir: Path) -> tuple[Path, Path]:
    """(stores folder, splits.json) at 64 px, infection target, kfold 3: 1 training,
    1 validation and 1 test case. Read-only (training and evaluation only read them)."""
    from covidseg.config import PrepareParams, SplitParams
    from covidseg.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("prepared")
    split = SplitParams(scheme="kfold", n_folds=3, folds=(0, 1, 2), val_fraction=0.5)
    out, splits = root / "prepared", root / "splits.json"
    prepare_dataset(
        PrepareParams(image_size=SIZE),
        split,
        raw_dir=shared_raw_dir,
        out_dir=out,
        splits_path=splits,
    )
    return out, splits


@pytest.fixture(scope="session")
def stores(
    tmp_path_factory: pytest.TempPathFactory, shared_raw_dir: Path
) -> tuple[Path, PrepareParams]:
    """(stores folder, prepare params) at 64 px with the lung + infection target, kfold 2.
    Read-only."""
    from covidseg.config import PrepareParams, SplitParams
    from covidseg.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("stores")
    params = PrepareParams(image_size=SIZE, target="lung_infection")
    split = SplitParams(scheme="kfold", n_folds=2, folds=(0, 1))
    out = root / "prepared"
    prepare_dataset(params, split, raw_dir=shared_raw_dir, out_dir=out, splits_path=root / "s.json")
    return out, params


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, stores: tuple[Path, PrepareParams]) -> Path:
    """An untrained U-Net saved as a model folder with the stores' recipe (probabilities near
    0.5 everywhere: the hardest case for two paths to agree on every label). Read-only."""
    import torch

    from covidseg.data.labels import LUNG_INFECTION
    from covidseg.data.transforms import recipe_of
    from covidseg.training.model import build_model
    from covidseg.training.modelio import ModelSpec, save_model

    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", None, LUNG_INFECTION.classes)
    recipe = recipe_of(stores[1])
    spec = ModelSpec(
        arch="Unet",
        encoder="resnet18",
        classes=LUNG_INFECTION.classes,
        target=LUNG_INFECTION.target,
        image_size=recipe.image_size,
        hu_window=recipe.hu_window,
        image_dtype=recipe.image_dtype,
        labels=LUNG_INFECTION.to_json(),
    )
    folder = tmp_path_factory.mktemp("models") / "model"
    save_model(folder, model.state_dict(), spec)
    return folder


# --- fitted networks ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lung_slices(stores: tuple[Path, PrepareParams]) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) of every stored slice: model input and lungs-with-lesions (bool);
    shared, so tests must not write into them.

    The phantoms' lesions are a few dozen voxels, too few to resolve 1 %: the tiny networks
    segment the lungs with their lesions (thousands of voxels) instead."""
    from covidseg.data.store import read_arrays

    arrays = [read_arrays(p, ("image", "mask")) for p in sorted(stores[0].glob("*.h5"))]
    images = np.concatenate([a["image"] for a in arrays])
    masks = np.concatenate([a["mask"] for a in arrays]) > 0
    return images, masks


@pytest.fixture(scope="session")
def unet_on_lungs(lung_slices: tuple[np.ndarray, np.ndarray]) -> torch.nn.Module:
    """A Unet / MobileNet-v2 fitted to `lung_slices` (80 steps). Tests must not change it."""
    from tiny import train_tiny

    return train_tiny(*lung_slices, steps=80)


@pytest.fixture(scope="session")
def unetpp_on_lungs(lung_slices: tuple[np.ndarray, np.ndarray]) -> torch.nn.Module:
    """A UNet++ / MobileNet-v2 fitted to `lung_slices` (60 steps). Tests must not change it."""
    from tiny import train_tiny

    return train_tiny(*lung_slices, steps=60, arch="UnetPlusPlus")


# --- MLflow -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its tables made (MLflow's migrations take seconds), to
    be copied, never used in place."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.search_experiments()  # creates and migrates the tables
    engine = getattr(client._tracking_client.store, "engine", None)
    if engine is not None:
        engine.dispose()  # no connection left open on the file that is copied
    return db


@pytest.fixture
def tracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Path:
    """MLflow in a fresh sqlite store of the test's own (`tmp_path / "mlflow.db"`, a copy of
    the empty database), the working folder beside it (the store's artifacts go there)."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(empty_mlflow_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    return db


# --- a reproduced cross-validation --------------------------------------------------------------


@pytest.fixture(scope="session")
def cv_repo(tmp_path_factory: pytest.TempPathFactory, mirror: Mirror) -> CvRepo:
    """A tiny three-fold CV (`cv_params`) reproduced as an interrupted CV is: `dvc repro
    train@0 train@1`, then `dvc repro`; results committed. Read-only: a test works in a copy
    (`pipeline_repo.copy_repo`).

    Built once per run, not per pytest-xdist worker: the first worker to need it builds it
    under a file lock in the run's shared temporary folder, the others wait and read it."""
    from filelock import FileLock
    from pipeline_repo import dvc, make_repo, run

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    folder, record = shared / "cv", shared / "cv.json"
    with FileLock(shared / "cv.lock"):
        if record.exists():
            built = json.loads(record.read_text())
            return CvRepo(path=Path(built["path"]), first=built["first"], second=built["second"])
        repo = make_repo(folder / "repo", cv_params(mirror))
        first = dvc(repo, "repro", "train@0", "train@1").stdout
        second = dvc(repo, "repro").stdout
        run(repo, "git", "add", "-A")
        run(repo, "git", "commit", "-qm", "baseline results")
        record.write_text(json.dumps({"path": str(repo), "first": first, "second": second}))
        return CvRepo(path=repo, first=first, second=second)
