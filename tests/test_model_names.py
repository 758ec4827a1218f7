"""`arch` and `encoder` are checked when params load, from a shipped list kept equal to SMP's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from covidseg import CovidSegError
from covidseg.config import parse_params
from covidseg.modelnames import known_names, live_names

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_names_equal_the_installed_smp_and_timm() -> None:
    assert known_names() == live_names()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"encoder": "tu-notamodel"}, "encoder: unknown encoder 'tu-notamodel': timm has no"),
        ({"encoder": "resnet999"}, "encoder: unknown encoder 'resnet999'"),
        ({"arch": "UNetXX"}, "arch: unknown architecture 'UNetXX'; choose one of DPT"),
    ],
)
def test_unknown_names_are_one_line_at_load(raw: dict, expected: str) -> None:
    with pytest.raises(CovidSegError) as caught:
        parse_params(raw)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_known_names_pass_whatever_the_case_of_the_architecture() -> None:
    params = parse_params({"arch": "unetplusplus", "encoder": "tu-resnet18"})
    assert (params.arch, params.encoder) == ("unetplusplus", "tu-resnet18")


def test_the_download_stage_refuses_a_bad_encoder_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"encoder": "tu-notamodel"}))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "download.py"), "--cache", "c", "--out", "raw"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: encoder: unknown encoder 'tu-notamodel': timm has no model named "
        "'notamodel'"
    ]
    assert not (tmp_path / "c").exists() and not (tmp_path / "raw").exists()
    assert time.perf_counter() - start < 30
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, covidseg.config; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.split("'")  # the check imports no torch
