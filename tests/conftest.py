"""Shared fixtures: synthetic cases, a folder mirror of the archives, a loopback HTTP mirror."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mirror_server import Mirror, MirrorServer
from phantoms import PhantomCase, default_cases, write_archives


@pytest.fixture(scope="session", autouse=True)
def messages_as_the_command_line_shows_them() -> None:
    """The package's log lines on stderr (`error: ...`), as the stage runner and the CLI set
    them up, also for library calls made in-process by tests."""
    from covidseg.log import configure

    configure()


@pytest.fixture(scope="session")
def phantom_cases() -> list[PhantomCase]:
    """The two default phantoms (read-only arrays, so sharing them is safe)."""
    return default_cases()


@pytest.fixture
def mirror(tmp_path_factory: pytest.TempPathFactory, phantom_cases: list[PhantomCase]) -> Mirror:
    """A fresh folder with the four archives written from `phantom_cases`."""
    folder = tmp_path_factory.mktemp("mirror")
    return Mirror(dir=folder, sha256=write_archives(phantom_cases, folder), cases=phantom_cases)


@pytest.fixture
def mirror_dir(mirror: Mirror) -> Path:
    return mirror.dir


@pytest.fixture
def http_mirror(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> Iterator[MirrorServer]:
    """A loopback HTTP server over `mirror.dir`; see `mirror_server` for failure injection."""
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(variable, "127.0.0.1,localhost")
    server = MirrorServer(mirror.dir).start()
    yield server
    server.stop()


@pytest.fixture
def raw_dir(mirror: Mirror, tmp_path: Path) -> Path:
    """The phantom archives extracted by the real download code from a folder mirror."""
    from covidseg.config import DownloadParams
    from covidseg.data.download import fetch_archives

    params = DownloadParams(base_url=str(mirror.dir), sha256=mirror.sha256)
    fetch_archives(params, cache_dir=tmp_path / "downloads", raw_dir=tmp_path / "raw")
    return tmp_path / "raw"


@pytest.fixture
def prepared(raw_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(stores folder, splits.json) at 64 px: 1 training, 1 validation and 1 test case."""
    from covidseg.config import PrepareParams, SplitParams
    from covidseg.data.prepare import prepare_dataset

    split = SplitParams(scheme="kfold", n_folds=3, folds=(0, 1, 2), val_fraction=0.5)
    out, splits = tmp_path / "prepared", tmp_path / "splits.json"
    prepare_dataset(
        PrepareParams(image_size=64), split, raw_dir=raw_dir, out_dir=out, splits_path=splits
    )
    return out, splits
