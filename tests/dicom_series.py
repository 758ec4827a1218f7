"""Synthetic DICOM CT series written with pydicom from an array and its RAS affine.

`write_series` writes image k of the series from `array[:, :, k]` (rows = the array's second
axis, columns its first), with the geometry the affine gives it: the reader under test must
rebuild the same array and affine. The patient module holds made-up identifiers (`PHI`), so
that a test can check none of them leaves the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLosslessSV1,
    generate_uid,
)

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-448812",
    "PatientBirthDate": "19510302",
    "AccessionNumber": "ACC-77123",
    "InstitutionName": "St Elsewhere",
    "SeriesDescription": "CHEST Doe^Jane",
    "StudyDescription": "CT THORAX Doe",
}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oriented(
    array: np.ndarray, affine: np.ndarray, axcodes: tuple[str, str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels with the array axes pointing to `axcodes` (the affine follows)."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(axcodes))
    moved = np.ascontiguousarray(apply_orientation(array, transform))
    return moved, affine @ inv_ornt_aff(transform, array.shape)


@dataclass(frozen=True)
class Study:
    """What the series of one study share."""

    study_uid: str
    frame_uid: str


def new_study() -> Study:
    return Study(generate_uid(), generate_uid())


def _base(study: Study, series_uid: str, *, modality: str = "CT", number: int = 3) -> Dataset:
    ds = Dataset()
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20200412", "101500", "1"
    ds.ReferringPhysicianName = ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.study_uid, series_uid
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_uid, ""
    ds.Modality, ds.SeriesNumber = modality, number
    ds.Manufacturer = "Synthetic"
    ds.SOPClassUID = CTImageStorage
    return ds


def slice_dataset(
    study: Study,
    series_uid: str,
    pixels: np.ndarray,
    *,
    position: np.ndarray,
    orientation: np.ndarray,
    spacing: tuple[float, float],
    slope: float = 1.0,
    intercept: float = -1024.0,
    number: int = 1,
) -> Dataset:
    """One CT image: `pixels` (rows, cols) in HU, stored as (HU - intercept) / slope."""
    ds = _base(study, series_uid)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{spacing[0]:.6f}", f"{spacing[1]:.6f}"]
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.ConvolutionKernel = "B70f"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    stored = np.round((pixels.astype(np.float64) - intercept) / slope)
    signed = bool(stored.min() < 0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write a Part 10 file, compressed to `syntax` where it is a compressed one."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    if UID(syntax) == JPEGLosslessSV1:
        ds.save_as(path, enforce_file_format=True)
        _gdcm_compress(path)
        return path
    if UID(syntax) != ExplicitVRLittleEndian:
        plugin = {"1.2.840.10008.1.2.5": "pydicom", "1.2.840.10008.1.2.4.80": "pyjpegls"}
        ds.compress(syntax, encoding_plugin=plugin.get(syntax, "pylibjpeg"))
    ds.save_as(path, enforce_file_format=True)
    return path


def _gdcm_compress(path: Path) -> None:
    """JPEG Lossless SV1 in place (pydicom has no encoder for it; GDCM has)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change(), path
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(path))
    assert writer.Write(), path


def geometry_of(affine: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of image k of a volume
    whose voxel (i, j, k) -> RAS is `affine` (i: column, j: row of the image)."""
    lps = RAS_TO_LPS @ affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    dc, dr = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    orientation = np.concatenate([col_step / dc, row_step / dr])
    position = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
    return position, orientation, (dr, dc)


def write_series(
    folder: Path,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    study: Study,
    series_uid: str | None = None,
    names: str = "ordered",
    slope: float = 1.0,
    intercept: float = -1024.0,
    syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> tuple[str, list[Dataset]]:
    """Write `hu` (columns, rows, slices) as a series; (its UID, the datasets in slice order).

    names: `ordered` (IM0001.dcm...), `reversed` (the last slice first), `shuffled` (random
    names without extension, some in a subfolder). `intercept` may be a float or, through
    `slope`, vary per slice when given as NaN (alternating -1024 and -1000)."""
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(seed)
    count = hu.shape[2]
    order = list(range(count))
    if names == "reversed":
        order.reverse()
    elif names == "shuffled":
        order = [int(v) for v in rng.permutation(count)]
    datasets = []
    for k in range(count):
        position, orientation, spacing = geometry_of(affine, k)
        this_intercept = (-1024.0 if k % 2 else -1000.0) if np.isnan(intercept) else intercept
        ds = slice_dataset(
            study,
            series_uid,
            hu[:, :, k].T,
            position=position,
            orientation=orientation,
            spacing=spacing,
            slope=slope,
            intercept=this_intercept,
            number=k + 1,
        )
        datasets.append(ds)
    for rank, k in enumerate(order):
        if names == "shuffled":
            name = f"{'sub/' if rank % 3 == 0 else ''}{rng.integers(10**8, 10**9)}"
        else:
            name = f"IM{rank + 1:04d}.dcm"
        save(datasets[k], folder / name, syntax)
    return series_uid, datasets


def localizer(folder: Path, study: Study, count: int = 2) -> str:
    """A scout series (ImageType LOCALIZER) of `count` 64x64 images."""
    uid = generate_uid()
    for k in range(count):
        ds = slice_dataset(
            study,
            uid,
            np.zeros((64, 64)),
            position=np.array([0.0, 0.0, float(k)]),
            orientation=np.array([1.0, 0, 0, 0, 0, -1]),
            spacing=(1.0, 1.0),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesNumber = 1
        save(ds, folder / f"scout{k}.dcm")
    return uid


def multi_frame(folder: Path, study: Study, frames: int = 8) -> str:
    """An Enhanced CT object (one file, several frames): only its headers matter here."""
    uid = generate_uid()
    ds = _base(study, uid, number=7)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.zeros((frames, 64, 64), np.int16).tobytes()
    save(ds, folder / "enhanced.dcm")
    return uid


def encapsulated_copy(ds: Dataset, path: Path, syntax: str) -> Path:
    """`ds` saved under a compressed transfer syntax with a dummy fragment (for syntaxes
    nothing here encodes: only the header is meant to be read)."""
    ds = ds.copy()
    save(ds, path)  # sets the file meta
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
