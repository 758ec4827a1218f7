"""End to end with DVC: `dvc repro` of the data stages against a loopback HTTP mirror."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from pipeline_repo import dvc, make_repo
from tiny import TINY

pytestmark = pytest.mark.slow


def test_dvc_repro_prepare_from_http_mirror(tmp_path: Path, http_mirror, mirror) -> None:
    params = {**TINY, "download": {"base_url": http_mirror.url, "sha256": mirror.sha256}}
    repo = make_repo(tmp_path / "repo", params)
    result = dvc(repo, "repro", "prepare")
    assert "Running stage 'download'" in result.stdout
    assert "Running stage 'prepare'" in result.stdout
    folds = json.loads((repo / "data" / "splits.json").read_text())
    names = sorted(case.name for case in mirror.cases)
    assert sorted(folds) == ["0", "1", "2"]  # every fold of the scheme, not only split.folds
    for split in folds.values():
        assert sorted(split["train"] + split["val"] + split["test"]) == names
        assert not set(split["test"]) & set(split["train"] + split["val"])
    assert sorted(c for split in folds.values() for c in split["test"]) == names
    for case in mirror.cases:
        with h5py.File(repo / "data" / "prepared" / f"{case.name}.h5") as f:
            assert f["image"].shape == (case.image.shape[2], 64, 64)
            assert int(f["mask"][()].sum()) == case.lesion_voxels
            assert f.attrs["encoding"] == case.encoding
            image = f["image"][()].astype(np.float32)
            assert image.min() >= 0.0 and image.max() <= 1.0
    assert (repo / "dvc.lock").exists()
    again = dvc(repo, "repro", "prepare")
    assert "didn't change, skipping" in again.stdout
    fetched = [s for s in http_mirror.seen if s.status in (200, 206)]
    assert len(fetched) == len(mirror.sha256)  # the second repro fetched nothing


def test_unreachable_mirror_is_one_line_and_leaves_nothing(tmp_path: Path, mirror) -> None:
    params = {
        **TINY,
        "download": {
            "base_url": "http://127.0.0.1:9/files",
            "sha256": mirror.sha256,
            "retries": 1,
            "backoff_s": 0.01,
        },
    }
    repo = make_repo(tmp_path / "repo", params)
    result = dvc(repo, "repro", "download", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "download.base_url" in errors[0]
    assert not (repo / "data" / "raw").exists()
