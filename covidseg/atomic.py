"""Outputs are rewritten whole: every writer of the project goes through this module.

A file or folder is written under a temporary sibling name (`.<name>.tmp-<random>`) and renamed
into place only when it is complete. A failure removes the temporary; a folder swap renames the
old folder aside first, so there is never a moment with nothing at the path; and each write of a
path first removes what a killed earlier writer of the same path left behind.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


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
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def swap_in(staging: Path, path: Path) -> None:
    """Put the folder `staging` at `path`; an old `path` is renamed aside, then removed."""
    old = None
    if path.exists() or path.is_symlink():
        old = _sibling(path, OLD_MARK)
        os.replace(path, old)
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
    """Yield an empty temporary sibling folder of `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        swap_in(tmp, path)
    finally:
        _remove(tmp)


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
