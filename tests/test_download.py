"""The download stage against a loopback HTTP mirror and a local-folder mirror."""

from __future__ import annotations

import re
import socket
import stat
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from mirror_server import Fault, Mirror, MirrorServer
from phantoms import ALL_ARCHIVES, IMAGES, LUNG, LUNG_AND_INFECTION, load_nifti

from covidseg.config import DownloadParams
from covidseg.data import download
from covidseg.data.download import fetch_archives, sha256_of
from covidseg.errors import CovidSegError


def params(base_url: str, sha256: dict[str, str], **overrides: Any) -> DownloadParams:
    """Small retries and backoff so that failure tests stay quick."""
    settings: dict[str, Any] = {"retries": 2, "backoff_s": 0.01, "timeout_s": 5} | overrides
    return DownloadParams(base_url=base_url, sha256=sha256, **settings)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(cache_dir, raw_dir) inside a folder of their own, so leftovers are easy to see."""
    work = tmp_path / "work"
    work.mkdir()
    return work / "downloads", work / "raw"


def leftovers(raw_dir: Path) -> list[str]:
    """Temporary siblings of raw_dir and .part files of the cache."""
    names = [p.name for p in raw_dir.parent.iterdir() if p.name.startswith(".")]
    return names + [p.name for p in raw_dir.parent.rglob("*.part")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_extracted(raw_dir: Path, mirror: Mirror) -> None:
    """Every member of every archive is in raw_dir/<stem>/ with the bytes of the zip."""
    for archive in ALL_ARCHIVES:
        with zipfile.ZipFile(mirror.dir / archive) as zipped:
            expected = {info.filename: zipped.read(info) for info in zipped.infolist()}
        assert snapshot(raw_dir / archive.removesuffix(".zip")) == expected


def test_http_fetch_extracts_and_reuses_the_cache(
    http_mirror: MirrorServer,
    mirror: Mirror,
    dirs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache, raw = dirs
    folders = fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert folders == [raw / name.removesuffix(".zip") for name in ALL_ARCHIVES]
    assert_extracted(raw, mirror)
    assert sorted(p.name for p in cache.iterdir()) == sorted(ALL_ARCHIVES)
    assert [(s.range, s.status) for s in http_mirror.seen] == [(None, 200)] * 4
    assert leftovers(raw) == []
    assert f"extracted {len(mirror.cases)} files" in capsys.readouterr().err

    (raw / "Lung_Mask" / "coronacases_001.nii.gz").write_bytes(b"stale")
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert len(http_mirror.seen) == 4  # the second run never contacted the server
    assert_extracted(raw, mirror)
    assert "already cached" in capsys.readouterr().err


def test_extracted_volumes_are_the_phantoms(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    for case in mirror.cases:
        image = load_nifti(raw / "COVID-19-CT-Seg_20cases" / f"{case.name}.nii.gz")
        assert nib.aff2axcodes(image.affine) == case.axcodes
        np.testing.assert_allclose(image.affine, case.affine, atol=1e-5)
        assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
        assert (
            np.asanyarray(image.dataobj).dtype == {"hu": np.int16, "uint8": np.uint8}[case.encoding]
        )
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), case.image)
        lung = np.asanyarray(load_nifti(raw / "Lung_Mask" / f"{case.name}.nii.gz").dataobj)
        assert lung.dtype == np.uint16
        np.testing.assert_array_equal(lung, case.lung)
        both = load_nifti(raw / "Lung_and_Infection_Mask" / f"{case.name}.nii.gz").dataobj
        assert set(np.unique(both)) == {0, 1, 2, 3}
        assert int((np.asanyarray(both) == 3).sum()) == case.lesion_voxels > 0
        z_axis = next(i for i, code in enumerate(case.axcodes) if code in "SI")
        per_slice = np.moveaxis(case.infection, z_axis, 0).reshape(case.image.shape[z_axis], -1)
        assert 0 < int(per_slice.any(axis=1).sum()) < case.image.shape[z_axis]


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_local_folder_mirror(mirror: Mirror, dirs: tuple[Path, Path], form: str) -> None:
    cache, raw = dirs
    base = str(mirror.dir) if form == "path" else mirror.dir.as_uri()
    fetch_archives(params(base, mirror.sha256), cache, raw)
    assert_extracted(raw, mirror)
    for name in ALL_ARCHIVES:
        assert (cache / name).read_bytes() == (mirror.dir / name).read_bytes()


def test_interrupted_download_resumes_with_range(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    http_mirror.fail(IMAGES, Fault(cut_after=10_000))
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    seen = [(s.range, s.status) for s in http_mirror.requests_for(IMAGES)]
    assert seen == [(None, 200), ("bytes=10000-", 206)]
    assert (cache / IMAGES).read_bytes() == (mirror.dir / IMAGES).read_bytes()
    assert_extracted(raw, mirror)


def test_part_file_from_an_earlier_run_is_resumed(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    cache.mkdir()
    (cache / f"{IMAGES}.part").write_bytes((mirror.dir / IMAGES).read_bytes()[:5000])
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert [s.range for s in http_mirror.requests_for(IMAGES)] == ["bytes=5000-"]
    assert sha256_of(cache / IMAGES) == mirror.sha256[IMAGES]


def test_server_ignoring_range_restarts_from_zero(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    cache.mkdir()
    (cache / f"{IMAGES}.part").write_bytes(b"x" * 5000)  # not even the right prefix
    http_mirror.ranges = False
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert [(s.range, s.status) for s in http_mirror.requests_for(IMAGES)] == [("bytes=5000-", 200)]
    assert (cache / IMAGES).read_bytes() == (mirror.dir / IMAGES).read_bytes()


@pytest.mark.parametrize("complete", [True, False])
def test_range_not_satisfiable(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path], complete: bool
) -> None:
    """416: a complete .part is verified and kept; a wrong one is fetched again from zero."""
    cache, raw = dirs
    cache.mkdir()
    good = (mirror.dir / IMAGES).read_bytes()
    (cache / f"{IMAGES}.part").write_bytes(good if complete else b"\0" * (len(good) + 10))
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    statuses = [s.status for s in http_mirror.requests_for(IMAGES)]
    assert statuses == ([416] if complete else [416, 200])
    assert (cache / IMAGES).read_bytes() == good


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_status_is_retried(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path], status: int
) -> None:
    cache, raw = dirs
    http_mirror.fail(LUNG, Fault(status=status))
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert [s.status for s in http_mirror.requests_for(LUNG)] == [status, 200]
    assert_extracted(raw, mirror)


def test_retries_back_off_exponentially_then_give_up(
    http_mirror: MirrorServer,
    mirror: Mirror,
    dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, raw = dirs
    delays: list[float] = []
    monkeypatch.setattr(download, "time", SimpleNamespace(sleep=delays.append))
    http_mirror.fail(LUNG, *[Fault(status=503)] * 4)
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(http_mirror.url, mirror.sha256, retries=3, backoff_s=0.5), cache, raw)
    assert delays == [0.5, 1.0, 2.0]
    assert len(http_mirror.requests_for(LUNG)) == 4  # 1 + 3 retries
    assert f"{http_mirror.url}/{LUNG}" in str(caught.value)
    assert "503" in str(caught.value)
    assert not raw.exists()


def test_stalled_reply_times_out_and_is_retried(
    http_mirror: MirrorServer,
    mirror: Mirror,
    dirs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache, raw = dirs
    http_mirror.fail(LUNG, Fault(stall_s=1.0))
    fetch_archives(params(http_mirror.url, mirror.sha256, timeout_s=0.3), cache, raw)
    assert f"{LUNG}: no data for 0.3 s; retrying (1/2 without progress)" in capsys.readouterr().err
    assert sha256_of(cache / LUNG) == mirror.sha256[LUNG]
    assert_extracted(raw, mirror)


def test_wrong_checksum_leaves_nothing(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    wrong = dict(mirror.sha256, **{LUNG: "0" * 64})
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(http_mirror.url, wrong), cache, raw)
    message = str(caught.value)
    assert LUNG in message and "0" * 64 in message and mirror.sha256[LUNG] in message
    assert not raw.exists()
    assert not (cache / LUNG).exists()
    assert leftovers(raw) == []


def test_stale_cached_archive_is_fetched_again(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    cache.mkdir()
    (cache / LUNG).write_bytes(b"an older, different file")
    fetch_archives(params(http_mirror.url, mirror.sha256), cache, raw)
    assert [s.range for s in http_mirror.requests_for(LUNG)] == [None]
    assert sha256_of(cache / LUNG) == mirror.sha256[LUNG]


def bad_mirror(mirror: Mirror, folder: Path, archive: str, data: bytes) -> dict[str, str]:
    """A copy of the mirror in `folder` with `archive` replaced by `data`; its sha256 map."""
    folder.mkdir()
    for name in ALL_ARCHIVES:
        (folder / name).write_bytes(data if name == archive else (mirror.dir / name).read_bytes())
    return {name: sha256_of(folder / name) for name in ALL_ARCHIVES}


def stored_zip_with_a_flipped_byte(path: Path) -> bytes:
    """A stored (uncompressed) zip whose member data no longer matches its CRC."""
    payload = bytes(range(256)) * 8
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("coronacases_001.nii.gz", payload)
    data = bytearray(path.read_bytes())
    data[data.find(payload) + 100] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_corrupt_zip_is_an_error_naming_the_archive(
    mirror: Mirror, dirs: tuple[Path, Path], tmp_path: Path, damage: str
) -> None:
    cache, raw = dirs
    if damage == "truncated":
        data = (mirror.dir / IMAGES).read_bytes()[:-2000]
    else:
        data = stored_zip_with_a_flipped_byte(tmp_path / "crc.zip")
    sums = bad_mirror(mirror, tmp_path / "bad", IMAGES, data)
    with pytest.raises(CovidSegError, match=re.escape(IMAGES)):
        fetch_archives(params(str(tmp_path / "bad"), sums), cache, raw)
    assert not raw.exists()
    assert leftovers(raw) == []


def symlink_member() -> zipfile.ZipInfo:
    """A zip entry flagged as a Unix symbolic link."""
    info = zipfile.ZipInfo("coronacases_link.nii.gz")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


UNSAFE = [
    "../evil.nii.gz",
    "../../evil.nii.gz",
    "sub/../../../evil.nii.gz",
    "..\\evil.nii.gz",
    "C:/evil.nii.gz",
    "{tmp}/absolute_evil.nii.gz",
    "symlink",
]


@pytest.mark.parametrize("member", UNSAFE)
def test_unsafe_members_are_refused(
    mirror: Mirror, dirs: tuple[Path, Path], tmp_path: Path, member: str
) -> None:
    cache, raw = dirs
    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("coronacases_001.nii.gz", b"a harmless first member")
        if member == "symlink":
            info = symlink_member()
            archive.writestr(info, "../../../evil.nii.gz")
            member = info.filename
        else:
            member = member.format(tmp=tmp_path)
            archive.writestr(member, b"evil")
    sums = bad_mirror(mirror, tmp_path / "bad", LUNG_AND_INFECTION, zipped.read_bytes())
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(str(tmp_path / "bad"), sums), cache, raw)
    assert LUNG_AND_INFECTION in str(caught.value) and repr(member) in str(caught.value)
    assert not raw.exists()
    assert leftovers(raw) == []
    assert not [p for p in tmp_path.parent.rglob("*evil*.nii.gz")]
    assert not [p for p in tmp_path.parent.rglob("*link*.nii.gz")]


def test_failed_rerun_keeps_the_earlier_raw_dir(
    mirror: Mirror, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    cache, raw = dirs
    fetch_archives(params(str(mirror.dir), mirror.sha256), cache, raw)
    before = snapshot(raw)
    good = (mirror.dir / IMAGES).read_bytes()
    sums = bad_mirror(mirror, tmp_path / "bad", IMAGES, good[:-100])
    with pytest.raises(CovidSegError, match=re.escape(IMAGES)):
        fetch_archives(params(str(tmp_path / "bad"), sums), cache, raw)
    assert snapshot(raw) == before
    assert leftovers(raw) == []


def test_successful_rerun_replaces_the_raw_dir(mirror: Mirror, dirs: tuple[Path, Path]) -> None:
    cache, raw = dirs
    (raw / "stale_folder").mkdir(parents=True)
    (raw / "stale_folder" / "old.nii.gz").write_bytes(b"old")
    fetch_archives(params(str(mirror.dir), mirror.sha256), cache, raw)
    assert sorted(p.name for p in raw.iterdir()) == sorted(n[:-4] for n in ALL_ARCHIVES)
    assert leftovers(raw) == []


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_host_says_how_to_use_a_mirror(
    mirror: Mirror,
    dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache, raw = dirs
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    base = f"http://127.0.0.1:{closed_port()}/files"
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(base, mirror.sha256), cache, raw)
    message = str(caught.value)
    assert message.startswith(f"cannot reach {base}/COVID-19-CT-Seg_20cases.zip: ")
    assert "connection refused" in message and "download.base_url" in message
    assert "\n" not in message
    assert not raw.exists()


def test_not_found_is_not_retried(
    http_mirror: MirrorServer, mirror: Mirror, dirs: tuple[Path, Path]
) -> None:
    cache, raw = dirs
    sums = {"Missing.zip": "1" * 64, **mirror.sha256}
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(http_mirror.url, sums), cache, raw)
    assert f"{http_mirror.url}/Missing.zip" in str(caught.value) and "404" in str(caught.value)
    assert [s.status for s in http_mirror.requests_for("Missing.zip")] == [404]
    assert not raw.exists()


@pytest.mark.parametrize("base", ["ftp://example.org/files", "/no/such/folder/anywhere"])
def test_unusable_base_url(dirs: tuple[Path, Path], base: str) -> None:
    cache, raw = dirs
    with pytest.raises(CovidSegError, match=re.escape("download.base_url")):
        fetch_archives(params(base, {IMAGES: "0" * 64}), cache, raw)
    assert not raw.exists()


def test_unknown_host_is_one_line_naming_the_url(
    mirror: Mirror, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    cache, raw = dirs
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    base = "https://mirror.example.invalid/files/"
    with pytest.raises(CovidSegError) as caught:
        fetch_archives(params(base, mirror.sha256, retries=0), cache, raw)
    assert str(caught.value).startswith(
        "cannot reach https://mirror.example.invalid/files/COVID-19-CT-Seg_20cases.zip: "
        "host name not found. Point download.base_url"
    )
