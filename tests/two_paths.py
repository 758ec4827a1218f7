"""The same cases through `evaluate`'s path (their prepared stores) and `predict`'s (their
scan files), for the tests that the two give the same labels."""

from __future__ import annotations

from pathlib import Path

import torch

from covidseg.data.store import read_arrays, read_meta
from covidseg.data.volumes import Volume, find_cases, read_nifti
from covidseg.evaluation.evaluate import predict_stored
from covidseg.inference.predict import Predictor, segment_scan
from covidseg.inference.segment import InferenceOptions, Segmentation
from covidseg.training.modelio import load_model

CPU = torch.device("cpu")


def evaluate_and_predict(
    raw_dir: Path, store_dir: Path, model_dir: Path, options: InferenceOptions
) -> list[tuple[Segmentation, Segmentation, Volume]]:
    """For each case in `raw_dir`: (evaluate's labels of its store in `store_dir`, predict's
    labels of its scan, the scan's canonical volume), the model of `model_dir` on the CPU."""
    model, spec = load_model(model_dir, CPU)
    predictor = Predictor(model=model, spec=spec, source="m", device=CPU, options=options)
    out = []
    for files in find_cases(raw_dir):
        store = store_dir / f"{files.name}.h5"
        image, meta = read_arrays(store, ("image",))["image"], read_meta(store)
        evaluated = predict_stored(model, image, meta, spec=spec, options=options, device=CPU)
        data, affine = read_nifti(files.image, files.name)
        predicted, _, volume = segment_scan(predictor, data, affine, files.name)
        out.append((evaluated, predicted, volume))
    return out
