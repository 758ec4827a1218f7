"""DICOM-SEG output: a series' predicted labels as a DICOM Segmentation instance (highdicom).

The instance belongs to the source's study (its Study Instance UID, Frame of Reference, patient
and study modules, as DICOM requires of a derived object) in a series of its own; it holds one
binary segment per foreground label of the model's `LabelScheme`, coded in SNOMED CT as
`covidseg.data.labels` declares, with the algorithm's identification (`covidseg`, its version
and the model), and one frame per source image that holds any label, each frame referencing
its source image. highdicom validates the object as it builds it. 3D Slicer
(QuantitativeReporting) and OHIF open it beside the CT.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from covidseg import __version__
from covidseg.atomic import atomic_file
from covidseg.data.dicom import DicomVolume
from covidseg.data.labels import Concept, LabelScheme

SNOMED = "SCT"
SERIES_NUMBER_OFFSET = 1000  # the SEG's series number: the source's + 1000
MAX_SERIES_NUMBER = 2**31 - 1


def _concept(code: Concept) -> hd.sr.CodedConcept:
    value, meaning = code
    return hd.sr.CodedConcept(value, SNOMED, meaning)


def algorithm(model: Mapping[str, object]) -> hd.AlgorithmIdentificationSequence:
    """`covidseg` at this version; the model's identity as the algorithm's parameters."""
    return hd.AlgorithmIdentificationSequence(
        name="covidseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters={key: str(value) for key, value in model.items()},
    )


def segment_descriptions(
    scheme: LabelScheme, identification: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    """One segment per foreground label; segment number = label value."""
    segments = []
    for value, name in scheme.display.items():
        code = scheme.code(value)
        segment = hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=name,
            segmented_property_category=_concept(code.category),
            segmented_property_type=_concept(code.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            anatomic_regions=[_concept(code.region)] if code.region else None,
        )
        if code.modifier is not None:  # laterality, inside the property type's item
            item = segment.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [_concept(code.modifier)]
        segments.append(segment)
    return segments


def segmentation(
    labels: np.ndarray, volume: DicomVolume, *, scheme: LabelScheme, model: Mapping[str, object]
) -> hd.seg.Segmentation:
    """The Segmentation of `labels`, given on the axes of `volume.image` (column, row, slice)."""
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slice, row, column)
    source = volume.sources[0]
    number = int(source.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    return hd.seg.Segmentation(
        source_images=list(volume.sources),
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(scheme, algorithm(model)),
        series_instance_uid=hd.UID(),
        series_number=min(number, MAX_SERIES_NUMBER),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="covidseg",
        manufacturer_model_name=f"covidseg {scheme.target}",
        software_versions=__version__,
        device_serial_number="none",
        series_description=f"covidseg {scheme.target} segmentation",
        content_label="COVIDSEG",
        content_description=f"covidseg {scheme.target}",
    )


def write_seg(
    path: Path,
    labels: np.ndarray,
    volume: DicomVolume,
    *,
    scheme: LabelScheme,
    model: Mapping[str, object],
) -> None:
    """Build, validate and write the DICOM-SEG of `labels` (see `segmentation`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom\.")  # they quote header values
        seg = segmentation(labels, volume, scheme=scheme, model=model)
    with atomic_file(path, suffix=".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
