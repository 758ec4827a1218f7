"""Reading CT series from DICOM files into the same in-memory NIfTI image a `.nii` file gives.

A folder (nested, any file names) is searched for DICOM files; they are grouped by
SeriesInstanceUID. Localizers, non-CT modalities and non-image objects are skipped with a note;
every other problem of a series (several series without `--series`, a missing slice, mixed
orientations or pixel spacings, gantry tilt, a multi-frame object, a corrupt file among its
slices, an unsupported transfer syntax, too few images) is one `CovidSegError` line, and
nothing is read of that series.

The volume is built in physical space from the headers, as dcm2niix does: slices sorted by
ImagePositionPatient along the normal of ImageOrientationPatient, RescaleSlope/Intercept
applied per image (Hounsfield units), DICOM's LPS patient coordinates turned into the RAS
affine nibabel uses. The array axes are (column, row, slice) of the DICOM images, so that
`labels[:, :, k].T` is the frame of source image k. From there a series takes the one path of
a NIfTI scan (`volumes.reorient`, `transforms.scan_input`).

Only UIDs and technical values (counts, numbers, spacings) leave the headers into messages;
names, dates, IDs and free-text descriptions never do.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from covidseg.errors import CovidSegError

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTI_FRAME_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
# transfer syntax -> the plugin that decodes it (None: stored uncompressed)
DECODERS: dict[str, str | None] = {
    "1.2.840.10008.1.2": None,  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": None,  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99": None,  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2": None,  # Explicit VR Big Endian
    "1.2.840.10008.1.2.4.57": "gdcm",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "gdcm",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.80": "gdcm",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "gdcm",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "gdcm",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91": "gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pydicom",  # RLE Lossless (pydicom's own decoder)
}
READABLE = "uncompressed, JPEG Lossless, JPEG-LS, JPEG 2000 or RLE Lossless"

MIN_SLICES = 5  # fewer images are no CT volume to grade a lung by
MIN_PIXELS = 32  # rows and columns
SPACING_TOLERANCE = 0.05  # a gap may differ from the series' spacing by 5 %
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
PIXEL_SPACING_TOLERANCE_MM = 1e-3
SHEAR_TOLERANCE = 0.1  # in-plane drift of the slices, in pixels, over the whole stack
# names that are never slices (CD and PACS export furniture); other files that are not DICOM
# but are named like slices (no extension, .dcm, .ima, a number) make their folder's series bad
EXPORT_EXTRAS = frozenset({"dicomdir", "lockfile", "version", "readme", "autorun.inf"})
SLICE_SUFFIXES = frozenset({"", ".dcm", ".dicom", ".dic", ".ima"})
# the header values this module reads, parsed when a file is first read
PARSED = (
    *("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality"),
    *("ImageType", "PhotometricInterpretation", "ConvolutionKernel"),
)
NUMBERS = (
    *("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "RescaleSlope"),
    *("RescaleIntercept", "SliceThickness", "SeriesNumber", "InstanceNumber"),
)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Series:
    """One series found under an input folder: its headers (no pixel data) in file order.

    `skip` says why it is no CT volume to segment (a note, not an error); `problem` is the
    error line of a series that cannot be read."""

    folder: Path
    uid: str
    headers: tuple[Dataset, ...] = field(repr=False)  # they hold the patient's identity
    files: tuple[Path, ...] = field(repr=False)
    skip: str | None = None
    problem: str | None = None

    @property
    def key(self) -> tuple[Path, str]:
        """What tells two inputs apart: the folder and the series UID."""
        return self.folder.resolve(), self.uid

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID of the series."""
        return str(self.headers[0].get("StudyInstanceUID", ""))

    def __str__(self) -> str:
        return f"{self.folder}: series {self.uid}"

    def describe(self) -> str:
        """`<uid> (series 3, 120 images, 1.0 mm, kernel B70f)`: technical values only."""
        first = self.headers[0]
        parts = [f"series {first.get('SeriesNumber', '?')}", f"{len(self.files)} images"]
        if _number(first, "SliceThickness", 0):
            parts.append(f"{_number(first, 'SliceThickness', 0):g} mm")
        if first.get("ConvolutionKernel"):
            parts.append(f"kernel {_text(first.ConvolutionKernel)}")
        return f"{self.uid} ({', '.join(parts)})"


@dataclass(frozen=True)
class DicomVolume:
    """A series read: the NIfTI image (HU, RAS affine) and the source headers in its slice
    order (`image`'s third axis), for the DICOM-SEG that references them."""

    image: nib.Nifti1Image
    sources: tuple[Dataset, ...] = field(repr=False)  # they hold the patient's identity
    series_uid: str
    study_uid: str


def _text(value: object) -> str:
    """A header value as text (a multi-valued one joined by backslashes)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return str(value)
    return "\\".join(str(v) for v in value)


def _slice_like(path: Path) -> bool:
    """Named like a DICOM slice: no extension, a DICOM one, or a number (`1.2.840...`)."""
    suffix = path.suffix.lower()
    return suffix in SLICE_SUFFIXES or suffix[1:].isdigit()


def _has_preamble(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def _number(header: Dataset, keyword: str, default: float) -> float:
    """A numeric header value, `default` where it is missing or empty."""
    value = header.get(keyword)
    return float(default if value is None or value == "" else value)


def read_header(path: Path) -> Dataset | None:
    """The header of a DICOM image file (no pixel data), None for a file that is not one or
    whose header is damaged (every value used later is parsed here)."""
    try:
        preamble = _has_preamble(path)
        if not preamble and not _slice_like(path):
            return None  # not read at all: README.TXT, a .nii.gz, a .png
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            header = dcmread(path, stop_before_pixels=True, force=not preamble)
            for keyword in PARSED:
                header.get(keyword)
            for keyword in NUMBERS:
                _number(header, keyword, 0)
            header.file_meta.get("TransferSyntaxUID")
    except Exception:  # a damaged file can fail anywhere in the parser
        return None
    return header if "SOPClassUID" in header else None  # a DICOMDIR or a forced read: no image


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, hidden ones aside, in name order."""
    found = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in found if not any(part.startswith(".") for part in p.parts[-1:]))


def find_series(folder: Path) -> list[Series]:
    """Every series under `folder`, grouped by SeriesInstanceUID, with why it is skipped or
    unreadable (a file named like a slice that is no DICOM makes its folder's series bad)."""
    headers: dict[str, list[tuple[Path, Dataset]]] = {}
    strays: dict[Path, list[Path]] = {}
    for path in _files(folder):
        header = read_header(path)
        uid = "" if header is None else str(header.get("SeriesInstanceUID", ""))
        if header is None or not uid or _cut_short(header):
            if _slice_like(path) and path.name.lower() not in EXPORT_EXTRAS:
                strays.setdefault(path.parent, []).append(path)
        elif header.get("Rows") is not None:  # an image (not a report)
            headers.setdefault(uid, []).append((path, header))
    series = []
    for uid, members in headers.items():
        files = tuple(p for p, _ in members)
        found = tuple(h for _, h in members)
        bad = sorted({s for p in files for s in strays.get(p.parent, [])})
        problem = None
        if bad:
            problem = (
                f"{folder}: series {uid}: {bad[0].relative_to(folder)} among its slices is not a "
                "readable DICOM file" + (f" ({len(bad) - 1} more)" if len(bad) > 1 else "")
            )
        series.append(Series(folder, uid, found, files, _skip(found), problem))
    return series


def _cut_short(header: Dataset) -> bool:
    """A CT image's header without its image size: a file cut short in its header."""
    classes = {CT_IMAGE_STORAGE, *MULTI_FRAME_CT}
    return str(header.SOPClassUID) in classes and header.get("Columns") is None


def _skip(headers: Sequence[Dataset]) -> str | None:
    """Why a series is no CT volume to segment (a localizer, another modality), or None."""
    first = headers[0]
    modality = str(first.get("Modality", ""))
    if modality != "CT":
        return f"modality {modality or 'unknown'}, {len(headers)} images"
    image_types = {v.upper() for h in headers for v in _text(h.get("ImageType", "")).split("\\")}
    if "LOCALIZER" in image_types or "SCOUT" in image_types:
        return f"localizer, {len(headers)} images"
    classes = {str(h.get("SOPClassUID", "")) for h in headers}
    if classes & set(MULTI_FRAME_CT) or classes == {CT_IMAGE_STORAGE}:
        return None
    return f"not CT image storage ({', '.join(sorted(UID(c).name for c in classes))})"


def series_inputs(folder: Path, wanted: frozenset[str]) -> tuple[list[Series], list[str]]:
    """(the CT series of `folder` to segment, one error line per series or folder refused).

    Without `wanted` a folder must hold one CT series; with it, those of its UIDs found here.
    Skipped series are a note each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote header values
        found = find_series(folder)
    if not found:
        return [], []  # no DICOM here (a folder of NIfTI files)
    for series in found:
        if series.skip is not None and series.uid not in wanted:
            log.info("%s: skipped series %s (%s)", folder, series.uid, series.skip)
    volumes = [s for s in found if s.skip is None]
    listing = "; ".join(s.describe() for s in volumes) or "none"
    if wanted:
        chosen = [s for s in found if s.uid in wanted]
        if not chosen:
            return [], [f"{folder}: no series named by --series here; its CT series: {listing}"]
    elif len(volumes) > 1:
        return [], [f"{folder}: {len(volumes)} CT series; pick one with --series UID: {listing}"]
    elif not volumes:
        skipped = "; ".join(f"{s.uid} ({s.skip})" for s in found)
        return [], [f"{folder}: no CT series to segment (skipped: {skipped})"]
    else:
        chosen = volumes
    problems = [s.problem for s in chosen if s.problem is not None]
    problems += [f"{folder}: series {s.uid} is no CT volume ({s.skip})" for s in chosen if s.skip]
    return [s for s in chosen if s.problem is None and s.skip is None], problems


# --- geometry -----------------------------------------------------------------------------------


def _floats(header: Dataset, keyword: str, count: int, where: str) -> np.ndarray:
    value = header.get(keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.array([])
    if array.shape != (count,) or not np.isfinite(array).all():
        raise CovidSegError(f"{where}: an image has no valid {keyword}")
    return array


@dataclass(frozen=True)
class Geometry:
    """The checked geometry of a series: the order of its images and the RAS affine."""

    order: np.ndarray
    affine: np.ndarray


def geometry(headers: Sequence[Dataset], where: str) -> Geometry:
    """Sort the images along their normal and check the stack is one regular volume."""
    sizes = {(int(_number(h, "Rows", 0)), int(_number(h, "Columns", 0))) for h in headers}
    rows, cols = min(sizes)
    if len(headers) < MIN_SLICES or rows < MIN_PIXELS or cols < MIN_PIXELS:
        raise CovidSegError(
            f"{where}: too small to be a CT volume ({len(headers)} images of {rows}x{cols}; "
            f"at least {MIN_SLICES} images of {MIN_PIXELS}x{MIN_PIXELS})"
        )
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise CovidSegError(f"{where}: mixed image sizes ({shown})")
    orientations = np.stack([_floats(h, "ImageOrientationPatient", 6, where) for h in headers])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise CovidSegError(f"{where}: mixed orientations (ImageOrientationPatient differs)")
    spacings = np.stack([_floats(h, "PixelSpacing", 2, where) for h in headers])
    if np.abs(spacings - spacings[0]).max() > PIXEL_SPACING_TOLERANCE_MM:
        shown = ", ".join(f"{r:g}x{c:g}" for r, c in sorted({tuple(s) for s in spacings}))
        raise CovidSegError(f"{where}: mixed pixel spacings ({shown} mm)")
    row_dir, col_dir = orientations[0, :3], orientations[0, 3:]
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    if abs(float(row_dir @ col_dir)) > ORIENTATION_TOLERANCE:
        raise CovidSegError(f"{where}: ImageOrientationPatient's directions are not orthogonal")
    normal = np.cross(row_dir, col_dir)
    positions = np.stack([_floats(h, "ImagePositionPatient", 3, where) for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    numbers = [str(headers[i].get("InstanceNumber", "")) for i in order]
    step = _check_spacing(along, numbers, where)
    _check_shear(positions, normal, pixel=float(spacings[0].min()), where=where)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacings[0][1]  # along a row: the column index, PixelSpacing[1]
    lps[:3, 1] = col_dir * spacings[0][0]  # down a column: the row index, PixelSpacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    return Geometry(order=order, affine=LPS_TO_RAS @ lps)


def _check_spacing(along: np.ndarray, numbers: Sequence[str], where: str) -> float:
    """The slice spacing; a duplicate position or an uneven gap (a missing slice) is an error
    naming the images around it (by InstanceNumber where they have one)."""

    def image(k: int) -> str:
        return f"instance {numbers[k]}" if numbers[k] else f"image {k + 1} of {len(along)}"

    gaps = np.diff(along)
    typical = float(np.median(gaps))
    if gaps.min() <= SPACING_TOLERANCE * max(typical, 1e-3):
        k = int(np.argmin(gaps))
        raise CovidSegError(
            f"{where}: two images at the same position ({image(k)} and {image(k + 1)} at "
            f"{along[k]:.2f} mm along the slice normal): several acquisitions, phases or copies "
            "mixed in one series"
        )
    uneven = np.abs(gaps - typical) > SPACING_TOLERANCE * typical
    if uneven.any():
        k = int(np.argmax(np.abs(gaps - typical)))
        raise CovidSegError(
            f"{where}: missing slice or uneven spacing: {gaps[k]:.2f} mm between {image(k)} and "
            f"{image(k + 1)} (at {along[k]:.2f} and {along[k + 1]:.2f} mm along the slice "
            f"normal) where the series' spacing is {typical:.2f} mm"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


def _check_shear(positions: np.ndarray, normal: np.ndarray, *, pixel: float, where: str) -> None:
    """Refuse slices that drift in-plane along the stack (gantry tilt, sheared geometry)."""
    offsets = positions - positions[0]
    through = offsets @ normal
    lateral = np.linalg.norm(offsets - np.outer(through, normal), axis=1)
    if lateral.max() > SHEAR_TOLERANCE * pixel:
        k = int(np.argmax(lateral))
        angle = float(np.degrees(np.arctan2(lateral[k], abs(through[k]))))
        raise CovidSegError(
            f"{where}: gantry tilt or sheared geometry (the slices drift {lateral[k]:.2f} mm "
            f"in-plane over {abs(through[k]):.1f} mm, {angle:.1f} degrees); not read: resample "
            "it to an orthogonal volume first (dcm2niix corrects gantry tilt)"
        )


# --- pixels -------------------------------------------------------------------------------------


def _rescale(header: Dataset) -> tuple[float, float]:
    return _number(header, "RescaleSlope", 1), _number(header, "RescaleIntercept", 0)


def _check_pixels(header: Dataset, where: str) -> str | None:
    """The decoder plugin of an image's transfer syntax; refuse what cannot be read."""
    syntax = UID(str(header.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")))
    if syntax not in DECODERS:
        raise CovidSegError(
            f"{where}: transfer syntax {syntax.name} ({syntax}) is not supported; "
            f"covidseg reads {READABLE}"
        )
    if _number(header, "NumberOfFrames", 1) > 1 or str(header.SOPClassUID) in MULTI_FRAME_CT:
        raise CovidSegError(
            f"{where}: a multi-frame (enhanced) CT object, which covidseg does not read; export "
            "the series as single-frame CT images"
        )
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric != "MONOCHROME2" or _number(header, "SamplesPerPixel", 1) != 1:
        raise CovidSegError(f"{where}: {photometric} images are not CT intensities")
    return DECODERS[syntax]


def _decode(path: Path, plugin: str | None, where: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            return pixel_array(path, decoding_plugin=plugin or "")
    except Exception as error:  # a damaged file can fail anywhere in the decoder
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CovidSegError(f"{where}: cannot decode {path.name} ({message})") from None


def _to_hu(
    files: Sequence[Path], headers: Sequence[Dataset], plugins: Sequence[str | None], where: str
) -> np.ndarray:
    """(slices, rows, cols) Hounsfield units: int16 where every image rescales exactly into it
    (as a NIfTI CT stores them), float32 otherwise."""
    rescale = [_rescale(h) for h in headers]
    exact = all(slope == 1 and intercept.is_integer() for slope, intercept in rescale)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    stack = np.empty((len(files), rows, cols), np.int16 if exact else np.float32)
    for k, (path, plugin, (slope, intercept)) in enumerate(
        zip(files, plugins, rescale, strict=True)
    ):
        raw = _decode(path, plugin, where)
        if raw.shape != (rows, cols):
            raise CovidSegError(f"{where}: {path.name} holds {raw.shape} pixels, not {rows}x{cols}")
        if stack.dtype == np.int16:
            values = raw.astype(np.int32) + int(intercept)
            if values.min() < -32768 or values.max() > 32767:
                stack = stack.astype(np.float32)  # beyond int16: the whole volume as float
            stack[k] = values
        else:
            stack[k] = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return stack


def read_series(series: Series) -> DicomVolume:
    """Decode a series into Hounsfield units on its physical grid (see the module's notes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote header values
        return _read_series(series)


def _read_series(series: Series) -> DicomVolume:
    where = str(series)
    if series.problem is not None:
        raise CovidSegError(series.problem)
    plugins = [_check_pixels(h, where) for h in series.headers]
    geo = geometry(series.headers, where)
    order = [int(i) for i in geo.order]
    headers = [series.headers[i] for i in order]
    stack = _to_hu([series.files[i] for i in order], headers, [plugins[i] for i in order], where)
    image = nib.Nifti1Image(stack.transpose(2, 1, 0), geo.affine)  # (column, row, slice)
    image.set_qform(geo.affine, code=1)  # scanner coordinates
    image.set_sform(geo.affine, code=1)
    image.header.set_xyzt_units("mm")
    return DicomVolume(image, tuple(headers), series.uid, series.study_uid)
