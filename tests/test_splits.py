"""Patient-level splits: the dataset authors' folds and seeded patient-grouped k-fold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covidseg import CovidSegError
from covidseg.config import SplitParams
from covidseg.data.splits import benchmark_fold, load_splits, make_split, make_splits, patient_of

ALL = [
    *(f"coronacases_{i:03d}" for i in range(1, 11)),
    "radiopaedia_4_85506_1",
    "radiopaedia_7_85703_0",
    "radiopaedia_10_85902_1",
    "radiopaedia_10_85902_3",
    "radiopaedia_14_85914_0",
    "radiopaedia_27_86410_0",
    "radiopaedia_29_86490_1",
    "radiopaedia_29_86491_1",
    "radiopaedia_36_86526_0",
    "radiopaedia_40_86625_0",
]


def test_patient_ids_group_same_patient_cases() -> None:
    assert patient_of("radiopaedia_29_86490_1") == patient_of("radiopaedia_29_86491_1")
    assert patient_of("radiopaedia_10_85902_1") == "radiopaedia_10"
    assert patient_of("coronacases_001") == "coronacases_001"


@pytest.mark.parametrize("protocol", ["16_4", "4_16"])
def test_benchmark_folds_are_the_authors(protocol: str) -> None:
    fold = benchmark_fold(protocol, 2)
    n_train = 16 if protocol == "16_4" else 4
    assert len(fold["train"]) == n_train and len(fold["test"]) == 20 - n_train
    shipped = Path(__file__).resolve().parents[1] / "covidseg" / "resources"
    data = json.loads((shipped / "benchmark_task1_splits.json").read_text())
    key = "folds_16train_4test" if protocol == "16_4" else "folds_4train_16test"
    assert sorted(data[key][2]["test"]) == fold["test"]


def test_benchmark_split_validates_within_training_cases() -> None:
    split = make_split(SplitParams(scheme="benchmark", protocol="16_4"), ALL, 1)
    assert split["test"] == benchmark_fold("16_4", 1)["test"]
    assert set(split["val"]) <= set(benchmark_fold("16_4", 1)["train"])
    assert len(split["val"]) >= 1 and not set(split["val"]) & set(split["train"])
    assert sorted(split["train"] + split["val"]) == benchmark_fold("16_4", 1)["train"]


def test_benchmark_with_absent_cases_says_which() -> None:
    with pytest.raises(CovidSegError) as error:
        make_split(SplitParams(), ALL[:3], 0)
    assert "not in the data" in str(error.value) and "radiopaedia_4_85506_1" in str(error.value)
    assert "split.scheme: kfold" in str(error.value)


def test_kfold_keeps_patients_together_and_covers_every_case() -> None:
    tested = []
    for fold in range(5):
        split = make_split(SplitParams(scheme="kfold", n_folds=5, seed=3), ALL, fold)
        for part in ("train", "val", "test"):
            pair = {"radiopaedia_29_86490_1", "radiopaedia_29_86491_1"} & set(split[part])
            assert len(pair) in (0, 2), (fold, part)
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ALL)
        tested += split["test"]
    assert sorted(tested) == sorted(ALL)  # each case is tested exactly once


def test_kfold_is_seeded() -> None:
    a = make_split(SplitParams(scheme="kfold", seed=1), ALL, 0)
    assert a == make_split(SplitParams(scheme="kfold", seed=1), ALL, 0)
    assert a != make_split(SplitParams(scheme="kfold", seed=2), ALL, 0)


def test_kfold_needs_enough_patients() -> None:
    with pytest.raises(CovidSegError, match="only 2 patients"):
        make_split(SplitParams(scheme="kfold", n_folds=3, folds=(0,)), ALL[:2], 0)


def test_splits_file_holds_every_fold_whatever_folds_are_chosen(tmp_path: Path) -> None:
    quick = make_splits(SplitParams(scheme="kfold", n_folds=4, folds=(0,), seed=3), ALL)
    full = make_splits(SplitParams(scheme="kfold", n_folds=4, folds=(0, 1, 2, 3), seed=3), ALL)
    assert quick == full and sorted(quick) == ["0", "1", "2", "3"]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(full))
    assert load_splits(path, 2) == make_split(
        SplitParams(scheme="kfold", n_folds=4, folds=(0,), seed=3), ALL, 2
    )
    with pytest.raises(CovidSegError, match="no fold 7"):
        load_splits(path, 7)
