"""Every benchmark script runs to its end on its `--quick` smoke settings and prints its results.

The numbers are not checked (they are the scripts' business, and noisy on a shared machine):
only that each script exits 0 and prints the lines it reports its findings in, which a broken
script (an API moved under it, a crash caught and logged) does not print.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HELPERS = {"_report.py", "_synth.py"}
END = "load average (1 min) at end:"  # every script's last line (`_report.load_note`)

# script -> (arguments, lines it must print); each runs in seconds to about a minute on 2 cores.
# A smoke run checks that the script works end to end, not its figures: the costly ones run
# at toy sizes (64 px, few steps or slices, one repeat)
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "agreement.py": (
        ["--quick", "--crop"],
        ["voxels equal", "case_0 ", "case_1 ", "Dice vs reference, fp32 / fast", END],
    ),
    "dicom_read.py": (
        ["--quick"],
        ["ratio DICOM/NIfTI: read", "canonical volumes voxel for voxel equal: True", END],
    ),
    "ensemble_log.py": (
        ["--quick"],
        ["reloaded output vs mean probability of the 2 folds: max |diff|", END],
    ),
    "evaluate_time.py": (
        ["--quick", "--size", "64", "--slices", "16", "--repeats", "1"],
        ["wall ratios vs bare inference:", "breakdown: steps after prediction add", END],
    ),
    "fold_overhead.py": (
        ["--quick", "--size", "64"],
        ["per-fold overhead (difference)", "ratio stage/bare:", END],
    ),
    "gpu_throughput.py": (["--quick"], ['"variant": "eager", "batch": 1', "| eager | 4 |"]),
    "predict_time.py": (
        ["--quick", "--variants", "--rss", "--size", "64"],
        [
            "ratio today / new defaults (whole command):",
            "ratio today / --precision int8 (whole command):",
            "bare auto, batch 2, body crop",
            "peak RSS of covidseg predict (defaults): two scans",
            END,
        ],
    ),
    "prepare_speed.py": (
        ["--quick"],
        ["ratio 512 gzip: wall", "ratio 256 gzip: wall", "costly steps vs equivalent calls", END],
    ),
    "prepare_workers.py": (
        ["--quick"],
        [
            "speed-up 2 workers / 1 (2nd runs):",
            "stores identical across worker counts: True",
            "peak RSS per worker, one 24 x 512 x 512 case:",
            END,
        ],
    ),
    "read_speed.py": (
        ["--quick"],
        ["512 px: store/npy throughput", "128 px: store/npy throughput", END],
    ),
    "train_throughput.py": (
        ["--quick", "--size", "64", "--batch", "2", "--steps", "2", "--repeats", "1"],
        ["stage: make_loader + train_epoch", "time ratio stage/bare", END],
    ),
}


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_every_script_has_a_quick_run() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_quick_run_prints_its_results(script: str) -> None:
    args, expected = RUNS[script]
    done = run_script(str(BENCH / script), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    missing = [line for line in expected if line not in done.stdout]
    assert not missing, f"{missing} not in:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "error:" not in done.stdout  # gpu_throughput reports a failed part this way


@pytest.mark.slow
def test_gpu_throughput_without_cuda_is_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would run for real")
    done = run_script(str(BENCH / "gpu_throughput.py"), timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["this benchmark needs a CUDA GPU (or --cpu-smoke)"]
    assert done.stdout == ""
