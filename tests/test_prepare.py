"""`prepare` on synthetic phantoms: orientation, intensities, stores, integrity checks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from phantoms import PhantomCase, canonical, nifti_gz_bytes

from covidseg import CovidSegError
from covidseg.config import PrepareParams, SplitParams
from covidseg.data.prepare import prepare_dataset
from covidseg.data.store import read_meta

PREPARE = PrepareParams(image_size=64, image_dtype="float32")
SPLIT = SplitParams(scheme="kfold", n_folds=3, folds=(0, 1, 2), val_fraction=0.5)


def padded(stack: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad (slices, H, W) with zeros to (slices, size, size)."""
    rows, cols = stack.shape[1:]
    top, left = (size - rows) // 2, (size - cols) // 2
    out = np.zeros((stack.shape[0], size, size), stack.dtype)
    out[:, top : top + rows, left : left + cols] = stack
    return out


def run_prepare(raw_dir: Path, out: Path, **changes) -> dict:
    params = PREPARE.model_copy(update=changes)
    return prepare_dataset(
        params, SPLIT, raw_dir=raw_dir, out_dir=out / "prepared", splits_path=out / "splits.json"
    )


def test_stores_hold_reoriented_masks_and_counts(raw_dir, tmp_path, phantom_cases):
    run_prepare(raw_dir, tmp_path)
    for case in phantom_cases:
        with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
            mask, lung, image = f["mask"][()], f["lung"][()], f["image"]
            assert image.shape == (case.image.shape[2], 64, 64)
            assert image.chunks == (1, 64, 64) and image.compression == "gzip"
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
            assert int(mask.sum()) == case.lesion_voxels
            expected = padded(canonical(case.infection, case.affine), 64)
            np.testing.assert_array_equal(mask, expected)
            np.testing.assert_array_equal(lung, padded(canonical(case.lung, case.affine), 64))
            flags = f.attrs["slice_has_infection"]
            np.testing.assert_array_equal(flags, expected.any(axis=(1, 2)))
            assert 0 < flags.sum() < len(flags)


def test_left_lung_is_on_the_viewers_right(raw_dir, tmp_path, phantom_cases):
    """Radiological display: patient's left (label 1) at high column indices in every case."""
    run_prepare(raw_dir, tmp_path)
    for case in phantom_cases:
        with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
            cols = np.nonzero(f["lung"][()])[2]
            labels = f["lung"][()][np.nonzero(f["lung"][()])]
            assert cols[labels == 1].mean() > cols[labels == 2].mean(), case.name


def test_same_hu_same_value_in_both_encodings(raw_dir, tmp_path, phantom_cases):
    run_prepare(raw_dir, tmp_path)
    by_encoding = {}
    for case in phantom_cases:
        meta = read_meta(tmp_path / "prepared" / f"{case.name}.h5")
        assert meta.encoding == case.encoding
        with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
            image = f["image"][()]
        hu = padded(canonical(case.hu.astype(np.float32), case.affine), 64)
        body = padded(np.ones_like(canonical(case.hu, case.affine), bool), 64)
        expected = (np.clip(hu, -1250, 250) + 1250) / 1500
        # uint8 encoding quantises HU in steps of 1500/255: half a step in [0, 1] units
        tolerance = 0.5 / 255 + 1e-6 if case.encoding == "uint8" else 1e-6
        np.testing.assert_allclose(image[body], expected[body], atol=tolerance)
        by_encoding[case.encoding] = np.median(image[body & (hu < -700) & (hu > -900)])
    assert abs(by_encoding["hu"] - by_encoding["uint8"]) <= 0.5 / 255 + 1e-6


def test_attributes_and_resize(raw_dir, tmp_path, phantom_cases):
    run_prepare(raw_dir, tmp_path, image_size=32)
    case = next(c for c in phantom_cases if c.name.startswith("radiopaedia"))
    meta = read_meta(tmp_path / "prepared" / f"{case.name}.h5")
    assert meta.original_shape == (10, 40, 64)
    assert meta.original_spacing == pytest.approx((6.0, 0.7, 0.7))
    assert meta.spacing == pytest.approx((6.0, 1.4, 1.4))  # 64 -> 32 halves the resolution
    assert meta.case == case.name and meta.hu_window == (-1250.0, 250.0)
    with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
        assert f["image"].shape == (10, 32, 32)
        assert set(np.unique(f["mask"][()])) <= {0, 1}
        assert abs(int(f["mask"][()].sum()) * 4 - case.lesion_voxels) < 0.35 * case.lesion_voxels


def test_reruns_are_byte_identical(raw_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run_prepare(raw_dir, first, image_dtype="float16")
    run_prepare(raw_dir, second, image_dtype="float16")
    digests = [
        {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (d / "prepared").iterdir()}
        for d in (first, second)
    ]
    assert digests[0] == digests[1] and len(digests[0]) == 3
    assert (first / "splits.json").read_bytes() == (second / "splits.json").read_bytes()


def test_lung_infection_target(raw_dir, tmp_path, phantom_cases):
    run_prepare(raw_dir, tmp_path, target="lung_infection")
    case = phantom_cases[0]
    with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
        mask = f["mask"][()]
    expected = padded(canonical(case.lung_and_infection, case.affine), 64)
    np.testing.assert_array_equal(mask, expected)


def replace_member(raw_dir: Path, archive: str, case: str, data: np.ndarray, affine) -> None:
    (raw_dir / archive / f"{case}.nii.gz").write_bytes(nifti_gz_bytes(data, affine))


def corrupt(raw_dir: Path, case: PhantomCase, kind: str) -> str:
    """Break one input in one way; return the text the error must contain."""
    image_dir = raw_dir / "COVID-19-CT-Seg_20cases"
    if kind == "gzip":
        path = image_dir / f"{case.name}.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 5])
        return "cannot read"
    if kind == "shape":
        replace_member(raw_dir, "Infection_Mask", case.name, case.infection[:-1], case.affine)
        return "shape"
    if kind == "affine":
        moved = case.affine.copy()
        moved[0, 3] += 2.0
        replace_member(raw_dir, "Infection_Mask", case.name, case.infection, moved)
        return "affine"
    if kind == "nan":
        image = case.image.astype(np.float32)
        image[0, 0, 0] = np.nan
        replace_member(raw_dir, "COVID-19-CT-Seg_20cases", case.name, image, case.affine)
        return "NaN"
    if kind == "labels":
        replace_member(raw_dir, "Infection_Mask", case.name, case.infection * 2, case.affine)
        return "values [2]"
    if kind == "partner":
        (raw_dir / "Lung_Mask" / f"{case.name}.nii.gz").unlink()
        return "no partner mask in Lung_Mask"
    if kind == "encoding":
        hu_like = case.image.astype(np.int16) * 4 - 1000
        replace_member(raw_dir, "COVID-19-CT-Seg_20cases", case.name, hu_like, case.affine)
        return "encoding"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["gzip", "shape", "affine", "nan", "labels", "partner", "encoding"]
)
def test_bad_input_is_one_clear_error_and_nothing_written(raw_dir, tmp_path, phantom_cases, kind):
    case = next(c for c in phantom_cases if c.name.startswith("radiopaedia"))
    good = tmp_path / "good"
    run_prepare(raw_dir, good)
    before = sorted(p.name for p in (good / "prepared").iterdir())
    expected = corrupt(raw_dir, case, kind)
    with pytest.raises(CovidSegError) as error:
        run_prepare(raw_dir, good)
    message = str(error.value)
    assert case.name in message and expected in message and "\n" not in message
    assert sorted(p.name for p in (good / "prepared").iterdir()) == before  # old output intact
    assert not [p for p in good.iterdir() if p.name.startswith(".")]  # no temp leftovers
    fresh = tmp_path / "fresh"
    with pytest.raises(CovidSegError):
        run_prepare(raw_dir, fresh)
    assert not (fresh / "prepared").exists() and not (fresh / "splits.json").exists()


def test_mask_without_image_is_named(raw_dir, tmp_path):
    shutil.copy(
        raw_dir / "Infection_Mask" / "coronacases_001.nii.gz",
        raw_dir / "Infection_Mask" / "coronacases_009.nii.gz",
    )
    with pytest.raises(CovidSegError, match="coronacases_009: mask in Infection_Mask has no CT"):
        run_prepare(raw_dir, tmp_path)


def test_a_3d_scan_saved_with_one_time_point_reads_as_3d(tmp_path, phantom_cases):
    from covidseg.data.volumes import read_nifti

    case = phantom_cases[0]
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(nifti_gz_bytes(case.image[..., None], case.affine))
    data, affine = read_nifti(path, "scan")
    np.testing.assert_array_equal(data, case.image)
    np.testing.assert_allclose(affine, case.affine)
    path.write_bytes(nifti_gz_bytes(np.stack([case.image] * 2, axis=-1), case.affine))
    with pytest.raises(CovidSegError, match="not a 3D volume"):
        read_nifti(path, "scan")


def test_lungs_from_the_lung_and_infection_labels_alone(raw_dir, tmp_path, phantom_cases):
    """Without Lung_Mask each infected voxel takes the side of its nearest lung voxel: the
    phantoms' lesions lie inside one lung each, so the whole lungs come back as drawn."""
    for archive in ("Lung_Mask", "Infection_Mask"):
        shutil.rmtree(raw_dir / archive)
    run_prepare(raw_dir, tmp_path, target="lung_infection")
    for case in phantom_cases:
        with h5py.File(tmp_path / "prepared" / f"{case.name}.h5") as f:
            mask, lung = f["mask"][()], f["lung"][()]
        expected = padded(canonical(case.lung_and_infection, case.affine), 64)
        np.testing.assert_array_equal(mask, expected)
        np.testing.assert_array_equal(lung, padded(canonical(case.lung, case.affine), 64))
        assert (expected == 3).sum() == case.lesion_voxels > 0


# what a prepare worker runs for one case, in a fresh process: its peak resident memory
# (VmHWM) less what it held after the imports
PREPARE_AND_MEASURE = """
import sys
from pathlib import Path
from covidseg.config import PrepareParams
from covidseg.data.prepare import prepare_case
from covidseg.data.store import write_store
from covidseg.data.volumes import find_cases

def status(key):
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

files = find_cases(Path(sys.argv[1]))[0]
imported = status("VmRSS")
arrays, meta = prepare_case(files, PrepareParams(target=sys.argv[3]))
write_store(Path(sys.argv[2]), arrays, meta)
print(status("VmHWM") - imported)
"""


def chest(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(int16 HU, lung + infection labels) of a simple chest, (x, y, z) axes: two lung
    ellipsoids in a body, and lesions in each lung."""
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    labels = np.zeros(shape, np.uint8)
    for side, centre in ((1, 0.4), (2, -0.4)):
        labels[((x - centre) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.1) ** 2 <= 1] = side
        for dz in (-0.5, 0.0, 0.5):
            lesion = ((x - centre) ** 2 + y**2 + (z - dz) ** 2 <= 0.15**2) & (labels == side)
            labels[lesion] = 3
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1
    noise = np.random.default_rng(0).integers(-20, 20, shape, dtype=np.int16)
    hu = np.where(body, np.int16(40), np.int16(-1000)) + noise
    hu[labels > 0] = -850 + noise[labels > 0]
    hu[labels == 3] += 400
    return hu, labels


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("target", ["lung_infection", "infection"])
def test_a_worker_needs_a_few_bytes_per_voxel_of_its_case(tmp_path, target):
    """A 384 x 384 x 160 case with lung and infection labels (int16 CT: 2 bytes per voxel) at
    512 px, float16: what is stored takes 4 bytes per voxel (image, mask, lungs). The raw CT
    and one label volume may live beside them, not a float32 copy of the volume nor a
    distance transform over the lungs (12 more bytes per voxel of their box)."""
    shape = (384, 384, 160)
    hu, labels = chest(shape)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])  # RAS on disk: reoriented (and copied) on reading
    raw = tmp_path / "raw"
    for archive, array in (("COVID-19-CT-Seg_20cases", hu), ("Lung_and_Infection_Mask", labels)):
        folder = raw / archive
        folder.mkdir(parents=True)
        nifti = nib.Nifti1Image(array, affine)
        nifti.set_qform(affine, code=1)
        nib.save(nifti, folder / "case_001.nii")
    done = subprocess.run(
        [sys.executable, "-c", PREPARE_AND_MEASURE, str(raw), str(tmp_path / "c.h5"), target],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    voxels = hu.size * (512 / 384) ** 2  # at the stored size
    with h5py.File(tmp_path / "c.h5") as f:
        assert set(f) == {"image", "mask", "lung"} and f["image"].shape == (160, 512, 512)
        assert (f["lung"][()] > 0).sum() > 0.05 * voxels
    peak = int(done.stdout.split()[-1])
    assert peak < 7 * voxels, f"{peak / voxels:.1f} bytes per stored voxel"
