"""Write the Zenodo archives, as the download stage extracted them, in nnU-Net v2's raw layout.

A worked example of laying out a dataset for `dataset.source: folder` (docs/tutorials/
own-dataset.md). The images become `imagesTr/<case>_0000.nii.gz` and the labels
`labelsTr/<case>.nii.gz`: Lung_and_Infection_Mask where it was downloaded (left lung, right lung,
infection: the labels of covidseg/resources/zenodo-3757476/dataset.json), else Infection_Mask
(infection alone). `patients.csv` keeps the record's patients together (the two Radiopaedia
cases of one patient). Files are linked, not copied, where the file system allows.

Usage: python tools/zenodo_to_nnunet.py data/raw /path/to/Dataset001_COVID19CTSeg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from covidseg.atomic import atomic_dir
from covidseg.data.folder import DATASET_JSON, IMAGES_TR, LABELS_TR, PATIENTS_CSV, link_file
from covidseg.data.splits import patient_of
from covidseg.data.volumes import INFECTION_ARCHIVE, LUNG_INFECTION_ARCHIVE, find_cases
from covidseg.errors import CovidSegError

DESCRIPTION = Path(__file__).resolve().parents[1] / "covidseg/resources/zenodo-3757476"


def convert(raw: Path, dest: Path) -> int:
    """Write `dest` (all or nothing) from the extracted archives in `raw`; the case count."""
    if dest.exists():
        raise CovidSegError(f"{dest}: already exists; name a new folder")
    cases = find_cases(raw)
    description = json.loads((DESCRIPTION / DATASET_JSON).read_text())
    if all(LUNG_INFECTION_ARCHIVE in case.masks for case in cases):
        archive, labels = LUNG_INFECTION_ARCHIVE, description["labels"]
    elif all(INFECTION_ARCHIVE in case.masks for case in cases):
        archive, labels = INFECTION_ARCHIVE, {"background": 0, "infection": 1}
    else:
        raise CovidSegError(f"{raw}: neither {LUNG_INFECTION_ARCHIVE} nor {INFECTION_ARCHIVE}")
    dataset = {
        **description,
        "labels": labels,
        "numTraining": len(cases),
        "description": f"Zenodo record 3757476: {len(cases)} cases, labels from {archive}",
    }
    with atomic_dir(dest) as staging:
        for case in cases:
            link_file(case.image, staging / IMAGES_TR / f"{case.name}_0000.nii.gz")
            link_file(case.masks[archive], staging / LABELS_TR / f"{case.name}.nii.gz")
        (staging / DATASET_JSON).write_text(json.dumps(dataset, indent=2) + "\n")
        rows = [f"{case.name},{patient_of(case.name)}" for case in cases]
        (staging / PATIENTS_CSV).write_text("\n".join(["case,patient", *rows]) + "\n")
    return len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="the extracted archives (data/raw)")
    parser.add_argument("dest", type=Path, help="the dataset folder to write")
    args = parser.parse_args()
    try:
        count = convert(args.raw, args.dest)
    except CovidSegError as error:
        sys.exit(f"error: {error}")
    print(f"{args.dest}: {count} cases in nnU-Net's raw layout")


if __name__ == "__main__":
    main()
