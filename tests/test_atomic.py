"""Outputs are replaced whole: a killed or failing writer leaves the old output and no litter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from covidseg import atomic
from covidseg.atomic import atomic_dir, atomic_file, write_json_atomic
from covidseg.data.store import CaseMeta, write_store
from covidseg.errors import CovidSegError

ROOT = Path(__file__).resolve().parents[1]


def siblings(path: Path) -> list[str]:
    """Everything beside `path` (hidden names included)."""
    return sorted(p.name for p in path.parent.iterdir())


def killed_midway(body: str, tmp_path: Path) -> None:
    """Run `body` in a child that kills itself (SIGKILL: no cleanup runs) half-way through."""
    code = textwrap.dedent(
        """
        import os, signal
        from pathlib import Path
        from covidseg.atomic import atomic_dir, atomic_file
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        """
    ) + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == -signal.SIGKILL


def test_a_killed_file_writer_leaves_the_old_file_and_the_next_write_clears_its_temp(
    tmp_path: Path,
) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    killed_midway(
        """
        with atomic_file(Path("metrics.json")) as tmp:
            tmp.write_text("half of the new")
            die()
        """,
        tmp_path,
    )
    assert target.read_text() == "old"
    assert len(siblings(target)) == 2  # the killed writer's temporary is still there
    write_json_atomic(target, {"dice": 0.5})
    assert target.read_text() == '{\n  "dice": 0.5\n}\n'
    assert siblings(target) == ["metrics.json"]


def test_a_killed_folder_writer_leaves_the_old_folder(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "a.png").write_text("old")
    killed_midway(
        """
        with atomic_dir(Path("reports")) as tmp:
            (tmp / "b.png").write_text("new")
            die()
        """,
        tmp_path,
    )
    old, killed = sorted(p.name for p in (tmp_path / "reports").iterdir())[::-1]
    assert old == "a.png" and killed.startswith(".tmp-")  # inside: DVC's restore removes it
    with atomic_dir(tmp_path / "reports") as tmp:
        (tmp / "b.png").write_text("new")
    assert siblings(tmp_path / "reports") == ["reports"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["b.png"]


def test_an_interrupted_writer_cleans_up_at_once(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert siblings(target) == ["model.pt"]


def test_a_store_with_non_finite_values_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    image = np.zeros((2, 4, 4), np.float16)
    image[1, 2, 2] = np.nan
    meta = CaseMeta(
        case="c",
        encoding="hu",
        target="infection",
        original_shape=(2, 4, 4),
        original_spacing=(1.0, 1.0, 1.0),
        spacing=(1.0, 1.0, 1.0),
        affine=np.eye(4).tolist(),
        hu_window=(-1250.0, 250.0),
        slice_has_infection=(0, 0),
    )
    with pytest.raises(CovidSegError, match="c: refusing to store image with NaN"):
        write_store(tmp_path / "c.h5", {"image": image}, meta)
    assert list(tmp_path.iterdir()) == []


def test_strict_json_refuses_nan_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "train.json"
    target.write_text("{}\n")
    with pytest.raises(ValueError):
        write_json_atomic(target, {"final_train_loss": float("nan")})
    assert target.read_text() == "{}\n"
    assert siblings(target) == ["train.json"]


def test_folder_swap_puts_the_old_folder_back_when_the_new_cannot_move_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "raw"
    target.mkdir()
    (target / "keep").write_text("old")
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def flaky(src: os.PathLike, dst: os.PathLike) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old folder was renamed aside; now the new one fails
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk trouble"), atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert calls[0][0] == "raw" and calls[0][1].startswith(".raw.old-")  # renamed aside first
    assert (target / "keep").read_text() == "old"
    assert siblings(target) == ["raw"]
