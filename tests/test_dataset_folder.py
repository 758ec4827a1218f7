"""A dataset of one's own in nnU-Net v2's raw layout (`dataset.source: folder`).

The download stage checks the folder and links it into data/raw in the Zenodo layout; prepare
then reads it through the record's own path (the stores of a converted phantom archive equal the
record's, array for array). Its labels become the run's scheme, a non-HU image is refused by
name, patients.csv groups the k-fold split, `split.scheme: benchmark` is refused, two prepare
workers write the bytes of one, every bad input is one line, and DVC sees a label edit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import operator
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from phantoms import PhantomCase, load_nifti, make_case, nifti_gz_bytes
from pipeline_repo import dvc, make_repo
from tiny import TINY, merge

from covidseg import CovidSegError
from covidseg.config import ZENODO_DESCRIPTION, DatasetParams, PrepareParams, SplitParams
from covidseg.data.folder import LABEL_MAP, ingest_folder, read_layout, resolve_labels
from covidseg.data.labels import INFECTION, LUNG_INFECTION
from covidseg.data.parallel import map_cases
from covidseg.data.prepare import prepare_dataset
from covidseg.data.volumes import IMAGE_ARCHIVE, INFECTION_ARCHIVE, LUNG_INFECTION_ARCHIVE

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"background": 0, "lesion": 1, "lung_left": 2, "lung_right": 3}  # not the record's
SPLIT = SplitParams(scheme="kfold", n_folds=3, folds=(0, 1, 2), val_fraction=0.5)
LUNGS = PrepareParams(image_size=64, target="lung_infection")
WHERE = Path("ds/dataset.json")


def label_volume(case: PhantomCase) -> np.ndarray:
    """The phantom's lungs and lesions in `LABELS`' values."""
    out = np.zeros(case.lung.shape, np.uint8)
    out[case.lung == 1] = LABELS["lung_left"]
    out[case.lung == 2] = LABELS["lung_right"]
    out[case.infection > 0] = LABELS["lesion"]
    return out


def nifti(array: np.ndarray, affine: np.ndarray, ending: str = ".nii.gz") -> bytes:
    data = nifti_gz_bytes(array, affine)
    return data if ending == ".nii.gz" else gzip.decompress(data)


def write_dataset(
    dest: Path,
    cases: list[PhantomCase],
    *,
    labels: dict[str, int] = LABELS,
    ending: str = ".nii.gz",
    label_of: Callable[[PhantomCase], np.ndarray] = label_volume,
    patients: dict[str, str] | None = None,
) -> Path:
    """`cases` as an nnU-Net raw dataset at `dest`."""
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True)
    for case in cases:
        image = dest / "imagesTr" / f"{case.name}_0000{ending}"
        image.write_bytes(nifti(case.image, case.affine, ending))
        label = dest / "labelsTr" / f"{case.name}{ending}"
        label.write_bytes(nifti(label_of(case), case.affine, ending))
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(cases)}
    (dest / "dataset.json").write_text(json.dumps({**dataset, "file_ending": ending}))
    if patients is not None:
        rows = [f"{case},{patient}" for case, patient in patients.items()]
        (dest / "patients.csv").write_text("\n".join(["case,patient", *rows]) + "\n")
    return dest


def source(folder: Path, encoding: str = "auto") -> DatasetParams:
    return DatasetParams(source="folder", folder=str(folder), encoding=encoding)  # type: ignore[arg-type]


def prepare(raw: Path, out: Path, dataset: DatasetParams | None, **kwargs: object) -> dict:
    params = kwargs.pop("params", LUNGS)
    split = kwargs.pop("split", SPLIT)
    return prepare_dataset(
        params,  # type: ignore[arg-type]
        split,  # type: ignore[arg-type]
        raw_dir=raw,
        out_dir=out / "prepared",
        splits_path=out / "splits.json",
        dataset=dataset,
        **kwargs,  # type: ignore[arg-type]
    )


def digests(out: Path) -> dict[str, str]:
    files = [*sorted((out / "prepared").glob("*.h5")), out / "splits.json"]
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_dataset_json_labels_become_the_scheme() -> None:
    plain = resolve_labels({"background": 0, "Lesion": 1}, None, WHERE)
    assert (plain.infection, plain.lungs, plain.archive) == ("Lesion", False, INFECTION_ARCHIVE)
    assert plain.scheme("infection") is INFECTION and plain.lut().tolist() == [0, 1]
    with pytest.raises(CovidSegError, match="lung_infection needs a left and a right lung"):
        plain.scheme("lung_infection")
    labels = {"background": 0, "vessel": 4, "Lung Right": 3, "lung_left": 2, "ggo_infection": 1}
    named = resolve_labels(labels, None, WHERE)
    assert (named.infection, named.left_lung, named.right_lung) == (
        "ggo_infection",
        "lung_left",
        "Lung Right",
    )
    assert named.scheme("lung_infection") is LUNG_INFECTION and named.background == ["vessel"]
    assert named.archive == LUNG_INFECTION_ARCHIVE
    assert named.lut().tolist() == [0, 3, 1, 2, 0]  # -> 1 left, 2 right, 3 infection, else 0
    chosen = resolve_labels({"background": 0, "consolidation": 1, "ggo": 2}, "ggo", WHERE)
    assert chosen.lut().tolist() == [0, 0, 1]
    shipped = read_layout(ROOT / ZENODO_DESCRIPTION)  # the record, described in these terms
    assert resolve_labels(shipped.labels, None, WHERE).lut().tolist() == [0, 1, 2, 3]


def test_an_ambiguous_or_missing_infection_label_is_an_error() -> None:
    labels = {"background": 0, "lesion_ggo": 1, "lesion_consolidation": 2}
    with pytest.raises(CovidSegError) as error:
        resolve_labels(labels, None, WHERE)
    message = str(error.value)
    assert "2 labels (lesion_ggo, lesion_consolidation)" in message
    assert "set dataset.infection_label" in message and "\n" not in message
    with pytest.raises(CovidSegError, match=r"'ggo' is not a label of ds/dataset\.json"):
        resolve_labels(labels, "ggo", WHERE)
    with pytest.raises(CovidSegError, match="infection or lesion: none"):
        resolve_labels({"background": 0, "tumour": 1}, None, WHERE)


def test_folder_stores_equal_the_zenodo_archives(
    tmp_path: Path,
    phantom_cases: list[PhantomCase],
    shared_raw_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases)
    raw = tmp_path / "raw"
    assert ingest_folder(source(folder), raw) == sorted(c.name for c in phantom_cases)
    err = capsys.readouterr().err
    assert re.search(r"images 3 (hard-linked|reflinked); labels 3 rewritten", err), err
    for case in phantom_cases:  # images linked byte for byte, labels in the record's values
        image = raw / IMAGE_ARCHIVE / f"{case.name}.nii.gz"
        assert image.read_bytes() == (folder / "imagesTr" / f"{case.name}_0000.nii.gz").read_bytes()
        label = raw / LUNG_INFECTION_ARCHIVE / f"{case.name}.nii.gz"
        np.testing.assert_array_equal(
            np.asanyarray(load_nifti(label).dataobj), case.lung_and_infection
        )
    assert json.loads((raw / LABEL_MAP).read_text())["infection"] == "lesion"
    prepare(shared_raw_dir, tmp_path / "zenodo", None)
    prepare(raw, tmp_path / "own", source(folder))
    for case in phantom_cases:
        with (
            h5py.File(tmp_path / "zenodo" / "prepared" / f"{case.name}.h5") as zenodo,
            h5py.File(tmp_path / "own" / "prepared" / f"{case.name}.h5") as own,
        ):
            assert set(own) == set(zenodo) == {"image", "mask", "lung"}
            for name in zenodo:
                np.testing.assert_array_equal(own[name][()], zenodo[name][()])
            assert {k: str(v) for k, v in own.attrs.items()} == {
                k: str(v) for k, v in zenodo.attrs.items()
            }
    assert digests(tmp_path / "own") == digests(tmp_path / "zenodo")  # splits.json too
    assert "each of the 3 cases is its own patient" in capsys.readouterr().err


def test_a_volume_not_in_hu_is_an_error_naming_the_case(
    tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases)  # radiopaedia_*: 0-255 encoded
    raw = tmp_path / "raw"
    ingest_folder(source(folder, "hu"), raw)
    with pytest.raises(CovidSegError) as error:
        prepare(raw, tmp_path, source(folder, "hu"))
    message = str(error.value)
    assert re.match(r"radiopaedia_4_85506_1: image values \d+\.\.\d+ look like a 0-255", message)
    assert "set dataset.encoding: uint8" in message and "\n" not in message
    assert not (tmp_path / "prepared").exists()  # nothing half-written
    with pytest.raises(CovidSegError, match=r"^coronacases_001: image values -\d+\.\.\d+ are out"):
        prepare(raw, tmp_path, source(folder, "uint8"))


def small_cases(names: list[str]) -> list[PhantomCase]:
    shape, axcodes, spacing = (32, 32, 8), ("L", "A", "S"), (1.5, 1.5, 5.0)
    return [
        make_case(n, encoding="hu", shape=shape, axcodes=axcodes, spacing=spacing, seed=i)
        for i, n in enumerate(names)
    ]


def test_patients_csv_groups_the_kfold_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = small_cases(["scan_a", "scan_b", "scan_c", "scan_d", "scan_e"])
    patients = {"scan_a": "p1", "scan_b": "p1", "scan_c": "p2", "scan_d": "p3", "scan_e": "p4"}
    folder = write_dataset(tmp_path / "ds", cases, patients=patients)
    raw = tmp_path / "raw"
    ingest_folder(source(folder), raw)
    split = SplitParams(scheme="kfold", n_folds=4, folds=(0,), val_fraction=0.34)
    params = PrepareParams(image_size=32)
    folds = prepare(raw, tmp_path / "grouped", source(folder), split=split, params=params)
    assert sorted(len(fold["test"]) for fold in folds.values()) == [1, 1, 1, 2]
    for fold in folds.values():
        together = [part for part, names in fold.items() if "scan_a" in names]
        assert together == [part for part, names in fold.items() if "scan_b" in names]
    five = split.model_copy(update={"n_folds": 5})
    with pytest.raises(CovidSegError, match="only 4 patients are present"):
        prepare(raw, tmp_path / "five", source(folder), split=five, params=params)
    (folder / "patients.csv").unlink()  # without it: each case its own patient, and the log says so
    ingest_folder(source(folder), raw)
    capsys.readouterr()
    folds = prepare(raw, tmp_path / "alone", source(folder), split=five, params=params)
    assert all(len(fold["test"]) == 1 for fold in folds.values())
    assert "no patients.csv in the dataset: each of the 5 cases is its own patient" in (
        capsys.readouterr().err
    )


def run_stage(script: str, params: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), params))
    )
    command = [sys.executable, f"stages/{script}", *args, "--params", str(path)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_benchmark_and_bad_input_are_one_line_with_exit_code_1(
    tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases)
    benchmark = {"dataset": {"source": "folder", "folder": str(folder)}}
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    done = run_stage("download.py", benchmark, tmp_path, "--cache", out, "--out", raw)
    assert done.returncode == 1 and done.stderr.count("\n") == 1  # as every stage starts
    assert "split.scheme: benchmark is the Zenodo record's folds" in done.stderr
    (folder / "labelsTr" / "coronacases_002.nii.gz").unlink()
    kfold = merge(benchmark, {"split": {"scheme": "kfold"}})
    done = run_stage("download.py", kfold, tmp_path, "--cache", out, "--out", raw)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: coronacases_002: imagesTr/coronacases_002_0000.nii.gz")
    assert "has no label (labelsTr/coronacases_002.nii.gz)" in done.stderr
    assert not Path(raw).exists()


def _json(folder: Path, **changes: object) -> None:
    path = folder / "dataset.json"
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def _label(folder: Path, case: PhantomCase, array: np.ndarray, affine: np.ndarray) -> None:
    (folder / "labelsTr" / f"{case.name}.nii.gz").write_bytes(nifti(array, affine))


def _copy_case(folder: Path, case: PhantomCase, image_name: str, label_name: str) -> None:
    (folder / "imagesTr" / image_name).write_bytes(nifti(case.image, case.affine))
    (folder / "labelsTr" / label_name).write_bytes(nifti(label_volume(case), case.affine))


BAD: dict[str, tuple[Callable[[Path, PhantomCase], object], str]] = {
    "no dataset.json": (lambda f, c: (f / "dataset.json").unlink(), "dataset.json: missing;"),
    "a key missing": (lambda f, c: _json(f, labels=None), "missing key 'labels'"),
    "two channels": (
        lambda f, c: _json(f, channel_names={"0": "CT", "1": "PET"}),
        "channel_names declares 2 channels (CT, PET)",
    ),
    "a second channel's file": (
        lambda f, c: (f / "imagesTr" / f"{c.name}_0001.nii.gz").write_bytes(b""),
        f"{'coronacases_001'}: imagesTr/coronacases_001_0001.nii.gz is a second channel",
    ),
    "an image without a label": (
        lambda f, c: (f / "labelsTr" / f"{c.name}.nii.gz").unlink(),
        "coronacases_001: imagesTr/coronacases_001_0000.nii.gz has no label",
    ),
    "a label without an image": (
        lambda f, c: (f / "imagesTr" / f"{c.name}_0000.nii.gz").unlink(),
        "coronacases_001: labelsTr/coronacases_001.nii.gz has no image",
    ),
    "a value dataset.json does not name": (
        lambda f, c: _label(f, c, np.where(c.infection > 0, 7, 0).astype(np.uint8), c.affine),
        "coronacases_001: labelsTr/coronacases_001.nii.gz has values [7] not among dataset.json",
    ),
    "another shape": (
        lambda f, c: _label(f, c, label_volume(c)[:, :, :-1], c.affine),
        "coronacases_001: labelsTr/coronacases_001.nii.gz has shape (64, 64, 11) but",
    ),
    "another affine": (
        lambda f, c: _label(f, c, label_volume(c), c.affine + np.diag([0, 0, 0.5, 0])),
        "coronacases_001: labelsTr/coronacases_001.nii.gz: its affine differs",
    ),
    "a duplicate case id": (
        lambda f, c: _copy_case(f, c, "Coronacases_001_0000.nii.gz", "Coronacases_001.nii.gz"),
        "duplicate case id in imagesTr/ ('Coronacases_001' and 'coronacases_001'",
    ),
    "a file outside the pattern": (
        lambda f, c: (f / "labelsTr" / "notes.txt").write_text("x"),
        "labelsTr/notes.txt: outside the layout (expected labelsTr/<case>.nii.gz)",
    ),
    "a wrong numTraining": (lambda f, c: _json(f, numTraining=5), "numTraining is 5 but"),
    "a patient listed twice": (
        lambda f, c: (f / "patients.csv").write_text(f"case,patient\n{c.name},a\n{c.name},b\n"),
        "patients.csv: line 3: duplicate case id 'coronacases_001'",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_is_one_line_naming_case_and_file(
    kind: str, tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases[:1] + phantom_cases[2:])
    damage, expected = BAD[kind]
    damage(folder, phantom_cases[0])
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "earlier.txt").write_text("an earlier download")
    with pytest.raises(CovidSegError) as error:
        ingest_folder(source(folder), raw)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["ds", "raw"]  # no temporary left beside it
    assert os.listdir(raw) == ["earlier.txt"]  # data/raw as it was


def test_two_workers_write_the_bytes_of_one(
    tmp_path: Path, phantom_cases: list[PhantomCase], capsys: pytest.CaptureFixture[str]
) -> None:
    labels = {"background": 0, "infection": 1}  # the record's values: labels are linked
    folder = write_dataset(
        tmp_path / "ds", phantom_cases, labels=labels, ending=".nii", label_of=lambda c: c.infection
    )
    raw = tmp_path / "raw"
    ingest_folder(source(folder), raw)
    assert (raw / INFECTION_ARCHIVE / "coronacases_001.nii").read_bytes() == (
        folder / "labelsTr" / "coronacases_001.nii"
    ).read_bytes()
    resized = PrepareParams(image_size=32)  # the workers resize too
    split = SplitParams(scheme="kfold", n_folds=3, folds=(0,))
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        prepare(raw, out, source(folder), params=resized, split=split, workers=workers)
        runs[workers] = digests(out)
    assert runs[1] == runs[2] and len(runs[1]) == 4
    err = capsys.readouterr().err
    assert err.count("prepare: 100%") >= 2 and "3/3" in err  # one bar per run, over cases
    with pytest.raises(
        CovidSegError, match=r"^radiopaedia_4_85506_1: image values \d+\.\.\d+ look"
    ):
        prepare(raw, tmp_path / "hu", source(folder, "hu"), params=resized, workers=2)
    assert os.listdir(tmp_path / "hu") == []  # a worker's error: one line, nothing half-written


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads a process id from /proc")
def test_workers_are_processes_and_results_keep_the_task_order() -> None:
    # library functions, so that the workers import nothing heavy
    pids = map_cases(os.readlink, ["/proc/self"] * 4, workers=2, desc="pids")
    assert str(os.getpid()) not in pids
    assert map_cases(operator.neg, list(range(8)), workers=2, desc="order") == [
        -i for i in range(8)
    ]
    with pytest.raises(CovidSegError, match=r"a worker process died .* runtime\.prepare_workers"):
        map_cases(os._exit, [1, 1], workers=2, desc="prepare")  # as the OOM killer would


def test_editing_one_label_file_is_a_change_dvc_sees(
    tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases)
    params = {"dataset": {"source": "folder", "folder": str(folder), "encoding": "auto"}}
    repo = make_repo(tmp_path / "repo", merge(TINY, params))
    dvc(repo, "repro", "download")
    assert "up to date" in dvc(repo, "status", "download").stdout
    case = phantom_cases[0]
    edited = label_volume(case)
    edited[edited == LABELS["lung_left"]] = 0  # one structure of one case relabelled
    (folder / "labelsTr" / f"{case.name}.nii.gz").write_bytes(nifti(edited, case.affine))
    status = dvc(repo, "status", "download").stdout
    assert "changed deps" in status and f"modified:           {folder}" in status, status


@pytest.mark.slow
def test_cross_validation_on_a_folder_and_a_label_edit_reruns_prepare(
    tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    folder = write_dataset(tmp_path / "ds", phantom_cases)
    params = {
        "dataset": {"source": "folder", "folder": str(folder), "encoding": "auto"},
        # one fold of the three: the folder source ends where the splits are made (all three
        # folds are checked below); what trains on them is the Zenodo path's (`cv_repo`)
        "split": {"folds": [0]},
        "runtime": {"prepare_workers": 2},
    }
    repo = make_repo(tmp_path / "repo", merge(TINY, params))
    dvc(repo, "repro")
    assert (repo / "reports" / "benchmark").is_dir() and (
        repo / "metrics" / "evaluate.json"
    ).is_file()
    tested = [json.loads((repo / "data" / "splits.json").read_text())[k]["test"] for k in "012"]
    assert sorted(case for test in tested for case in test) == sorted(c.name for c in phantom_cases)
    case = phantom_cases[0]
    edited = label_volume(case)
    edited[edited == LABELS["lesion"]] = LABELS["lung_left"]
    (folder / "labelsTr" / f"{case.name}.nii.gz").write_bytes(nifti(edited, case.affine))
    assert "download:" in dvc(repo, "status").stdout
    dvc(repo, "repro", "download")
    status = dvc(repo, "status").stdout
    assert "prepare:" in status and "modified:           data/raw" in status, status
