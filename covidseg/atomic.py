"""Outputs are rewritten whole: every writer of the project goes through this module.

A file is written under a temporary sibling name (`.<name>.tmp-<random>`), a folder under a
temporary folder inside the old one (`<name>/.tmp-<random>`), and either is renamed into place
only when it is complete. A failure removes the temporary (a full disk is one line naming the
path); a folder swap renames the old folder aside first and back if the new one cannot move in;
and each write of a path first removes what a killed earlier writer of the same path left
behind. A killed folder writer's temporary is part of the output folder, so DVC also removes it
when it restores that output from its cache instead of running the stage.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from covidseg.errors import CovidSegError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk or quota, a too-large file


def _sibling(path: Path, mark: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}{mark}{uuid.uuid4().hex[:8]}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(path: Path) -> list[Path]:
    """Delete the temporaries that killed writers of `path` left beside it; what was removed."""
    found = []
    for mark in (TMP_MARK, OLD_MARK):
        pattern = str(path.parent / f".{glob.escape(path.name)}{mark}*")
        found += [Path(p) for p in glob.glob(pattern, include_hidden=True)]
    for stale in found:
        _remove(stale)
    return found


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`.

    `suffix` ends the temporary name, for writers that choose a format by extension
    (`.nii.gz`). On any failure, an interrupt included, the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _sibling(path, TMP_MARK, suffix)
    try:
        with no_space_error(path, tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        _remove(tmp)


class NoSpace(CovidSegError):
    """A full disk (or quota) while writing `path`: nothing was written there."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: not written ({reason}); free some space and run again")
        self.path, self.reason = path, reason


@contextmanager
def no_space_error(path: Path, tmp: Path) -> Iterator[None]:
    """Turn a full disk while writing `path` (through its temporary `tmp`) into one line
    naming the file of the output that could not be written, never a temporary name."""
    try:
        yield
    except NoSpace as error:  # a file of a folder that is being written
        if not error.path.is_relative_to(tmp):
            raise
        raise NoSpace(path / error.path.relative_to(tmp), error.reason) from None
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        where = path
        if isinstance(error.filename, str) and Path(error.filename).is_relative_to(tmp):
            where = path / Path(error.filename).relative_to(tmp)
        raise NoSpace(where, os.strerror(error.errno)) from None


def _second_name(path: Path) -> Path:
    """A hidden second name for the file at `path` (a hard link; a copy where links fail)."""
    old = _sibling(path, OLD_MARK)
    try:
        os.link(path, old)
    except OSError:
        shutil.copy2(path, old)
    return old


@contextmanager
def atomic_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporaries for files that appear together: on success each replaces its path, in the
    order given (the last is the one whose presence says the set is complete). A failure
    before or during the renames (an interrupt, a full disk) puts the old files back, so the
    paths hold the old set or the new one. Each temporary's name ends with its file's name,
    for writers that choose a format by extension."""
    paths = [Path(p) for p in paths]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
    tmps = [_sibling(path, TMP_MARK, f"-{path.name}") for path in paths]
    olds: dict[Path, Path] = {}  # path -> a second name of the file it held
    placed: list[Path] = []
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            if path.exists():
                olds[path] = _second_name(path)
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:  # back to the old set
            if path in olds:
                os.replace(olds.pop(path), path)
            else:
                _remove(path)
        raise
    finally:
        for leftover in (*tmps, *olds.values()):
            _remove(leftover)


def swap_in(staging: Path, path: Path) -> None:
    """Put the folder `staging` (beside `path` or inside it) at `path`; an old `path` is
    renamed aside, then removed."""
    old = None
    if path.exists() or path.is_symlink():
        old = _sibling(path, OLD_MARK)
        os.replace(path, old)
        if staging.parent == path:
            staging = old / staging.name
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder inside the folder `path` (made if need be); on success
    it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    made = not path.exists()
    path.mkdir(exist_ok=True)
    for stale in path.glob(f"{TMP_MARK}*"):
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_MARK, dir=path))
    tmp.chmod(0o755)
    done = False
    try:
        with no_space_error(path, tmp):
            yield tmp
            swap_in(tmp, path)
        done = True
    finally:
        if not done:
            _remove(tmp)
            if made and not any(path.iterdir()):
                path.rmdir()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a binary file whole, or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole, or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: object) -> None:
    """Write strict JSON (indented, trailing newline; NaN or Inf is a ValueError) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
