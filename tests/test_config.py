"""params.yaml is validated at start-up: one clear line for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covidseg import CovidSegError
from covidseg.config import ZENODO_SHA256, Params, flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_match_the_study() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params == Params()  # params.yaml spells out the defaults
    assert (params.arch, params.encoder) == ("UnetPlusPlus", "densenet201")
    assert (params.train.lr, params.train.epochs, params.train.batch_size) == (1e-4, 100, 2)
    assert params.train.encoder_weights is None
    assert params.download.sha256 == ZENODO_SHA256 and len(ZENODO_SHA256) == 4
    assert params.split.protocol == "16_4"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lrr": 0.1}}, "train.lrr: unknown key"),
        ({"banana": 1}, "banana: unknown key"),
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
        ({"prepare": {"hu_window": [250, -1250]}}, "prepare.hu_window: needs low < high"),
        ({"prepare": {"image_size": 100}}, "prepare.image_size: must be a multiple of 32"),
        ({"split": {"folds": [5]}}, "folds [5] do not exist: benchmark has folds 0-4"),
        ({"split": {"folds": []}}, "name at least one fold"),
        ({"split": {"folds": [1, 1]}}, "names a fold twice"),
        ({"split": {"fold": 0}}, "split.fold: moved to split.folds, a list"),
        ({"split": {"protocol": "8_12"}}, "split.protocol"),
        ({"download": {"sha256": {"a.zip": "xyz"}}}, "download.sha256.a.zip"),
        ({"download": {"sha256": {"../a.zip": "0" * 64}}}, "not a plain .zip archive name"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
        ({"train": {"device": "cpu"}}, "train.device: moved to runtime.device"),
        ({"train": {"num_workers": 4}}, "train.num_workers: moved to runtime.num_workers"),
        ({"evaluate": {"batch_size": 4}}, "evaluate.batch_size: moved to runtime.eval_batch_size"),
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
        ({"prepare": {"hu_window": [float("-inf"), 250]}}, "prepare.hu_window.0: Input should"),
        ({"train": {"loss": {"bce_weight": float("nan")}}}, "train.loss.bce_weight: Input should"),
        ({"dataset": {"source": "nas"}}, "dataset.source: Input should be 'zenodo-3757476'"),
        ({"dataset": {"encoding": "hounsfield"}}, "dataset.encoding: Input should be 'hu'"),
        ({"dataset": {"folder": ""}}, "dataset.folder: String should have at least 1"),
        ({"runtime": {"prepare_workers": 0}}, "runtime.prepare_workers: Input should be greater"),
        (
            {"dataset": {"source": "folder"}, "split": {"scheme": "kfold"}},
            "dataset.folder: name your dataset's folder",
        ),
        (
            {"dataset": {"source": "folder", "folder": "ct"}},
            "split.scheme: benchmark is the Zenodo record's folds; a folder dataset needs split",
        ),
    ],
)
def test_bad_values_are_one_line_errors(raw: dict, expected: str) -> None:
    with pytest.raises(CovidSegError) as error:
        parse_params(raw, "params.yaml")
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("params.yaml: ")


def test_unquoted_protocol_read_by_yaml11_still_means_16_4() -> None:
    raw = yaml.safe_load("split:\n  protocol: 4_16\n")
    assert raw["split"]["protocol"] == 416  # what PyYAML makes of it
    assert parse_params(raw).split.protocol == "4_16"


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(CovidSegError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(CovidSegError, match="not valid YAML"):
        load_params(broken)


def test_dataset_defaults_are_the_zenodo_record_and_a_folder_needs_kfold() -> None:
    params = Params()
    assert params.dataset.source == "zenodo-3757476" and params.runtime.prepare_workers is None
    assert (ROOT / params.dataset.folder / "dataset.json").is_file()  # DVC needs the path
    folder = parse_params(
        {
            "dataset": {"source": "folder", "folder": "ct", "encoding": "auto"},
            "split": {"scheme": "kfold"},
        }
    )
    assert (folder.dataset.folder, folder.dataset.encoding) == ("ct", "auto")
    assert flatten(folder)["dataset.source"] == "folder"


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(Params())
    assert flat["train.lr"] == 1e-4 and flat["encoder"] == "densenet201"
    assert flat["train.loss.bce_weight"] == 1.0
    assert flat["prepare.hu_window"] == [-1250.0, 250.0]
