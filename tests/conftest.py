"""Shared fixtures: synthetic cases, a folder mirror of the archives, a loopback HTTP mirror."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mirror_server import Mirror, MirrorServer
from phantoms import PhantomCase, default_cases, write_archives


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
