"""A throwaway copy of the project in a fresh git + DVC repository, for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mirror_server import Mirror
from tiny import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("stages", "covidseg", "plots", "dvc.yaml", "params.yaml")


def env() -> dict[str, str]:
    """The environment of a user who activated the project's virtualenv."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["DVC_NO_ANALYTICS"] = "1"
    out["OMP_NUM_THREADS"] = out.get("OMP_NUM_THREADS", "2")
    out["GIT_AUTHOR_NAME"] = out["GIT_COMMITTER_NAME"] = "test"
    out["GIT_AUTHOR_EMAIL"] = out["GIT_COMMITTER_EMAIL"] = "test@example.org"
    return out


def run(
    repo: Path, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run a command in the repository; on failure the assertion shows its output."""
    result = subprocess.run(
        args, cwd=repo, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def dvc(repo: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def make_repo(dest: Path, params: dict) -> Path:
    """Copy the pipeline into `dest`, write `params` over params.yaml, git + dvc init, commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, dest / name)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(base, params), sort_keys=False))
    shutil.copy(ROOT / ".gitignore", dest / ".gitignore")
    run(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    config = ROOT / ".dvc" / "config"
    if config.exists():
        shutil.copy(config, dest / ".dvc" / "config")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "pipeline")
    return dest


@dataclass(frozen=True)
class CvRepo:
    """A pipeline repository after a tiny three-fold CV, committed (the `cv_repo` fixture);
    `first` and `second` are the outputs of its two `dvc repro` runs: folds 0 and 1, then the
    whole pipeline."""

    path: Path
    first: str
    second: str


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a pipeline repository (git, DVC cache, MLflow store) at `dest`. The MLflow
    store records absolute artifact locations: they are rewritten to `dest`, so nothing the
    copy runs writes into `source`."""
    shutil.copytree(source, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        old, new = str(source.absolute()), str(dest.absolute())
        with closing(sqlite3.connect(db)) as connection, connection:
            tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            for (table,) in tables.fetchall():
                for column in connection.execute(f"PRAGMA table_info('{table}')").fetchall():
                    name, kind = column[1], str(column[2]).upper()
                    if "CHAR" in kind or "TEXT" in kind:
                        connection.execute(
                            f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?)', (old, new)
                        )
    return dest


def cv_params(mirror: Mirror) -> dict[str, Any]:
    """The params of the `cv_repo` run: TINY, three kfold folds, fetched from `mirror`."""
    return merge(
        TINY,
        {
            "split": {"folds": [0, 1, 2]},
            "download": {"base_url": str(mirror.dir), "sha256": mirror.sha256},
        },
    )
