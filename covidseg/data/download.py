"""The `download` stage: fetch the archives (resumable, retried, checksummed) and extract them.

Archives are kept in a cache folder outside the DVC output, so a repeated or resumed run does not
fetch them again. `raw_dir` is built in a temporary sibling and swapped into place only when every
archive has been verified and extracted, so a failure never leaves a partial `raw_dir` behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from covidseg.atomic import atomic_dir
from covidseg.config import DownloadParams, redact
from covidseg.errors import CovidSegError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MIRROR_HINT = (
    "Point download.base_url in params.yaml at a mirror (an http(s) URL or a local folder "
    "holding the archives), e.g. dvc exp run -S download.base_url=/path/to/mirror"
)
_REASONS = (
    ("Name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("getaddrinfo failed", "host name not found"),
    ("Failed to resolve", "host name not found"),
    ("Temporary failure in name resolution", "name resolution failed"),
    ("Connection refused", "connection refused"),
    ("Network is unreachable", "network is unreachable"),
    ("No route to host", "no route to host"),
    ("Connection reset", "connection reset"),
    ("Connection timed out", "connection timed out"),
    ("IncompleteRead", "connection closed before the end of the file"),
    ("Connection broken", "connection broken"),
    ("Connection aborted", "connection aborted"),
    ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
)


class _Transient(Exception):
    """A failure worth retrying; `unreachable` when no reply came back at all."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


class _Restart(Exception):
    """The partial file is of no use: start again from byte 0 (costs no retry)."""


def fetch_archives(params: DownloadParams, cache_dir: Path, raw_dir: Path) -> list[Path]:
    """Fetch every archive of `params.sha256` into `cache_dir`, verify it, extract it.

    Returns the extracted folders `raw_dir/<archive name without .zip>`, in `params.sha256` order.
    Every failure is a `CovidSegError`; `raw_dir` is then left as it was. No message shows the
    credentials of a mirror URL (`https://***@host/...`).
    """
    try:
        return _fetch_all(params, cache_dir, raw_dir)
    except CovidSegError as error:
        raise CovidSegError(redact(str(error))) from None


def _fetch_all(params: DownloadParams, cache_dir: Path, raw_dir: Path) -> list[Path]:
    source = _parse_source(params.base_url)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        archives = [
            _obtain(session, source, name, digest, params=params, cache_dir=cache_dir)
            for name, digest in params.sha256.items()
        ]
    return _extract_all(archives, Path(raw_dir))


# --- where the archives come from -------------------------------------------------------------


def _parse_source(base_url: str) -> str | Path:
    """An http(s) base URL (no trailing slash), or the local folder it names."""
    parsed = urlparse(base_url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise CovidSegError(f"download.base_url {base_url!r} has no host. {MIRROR_HINT}")
        return base_url.rstrip("/")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise CovidSegError(f"download.base_url {base_url!r}: only local file:// URLs work")
        folder = Path(url2pathname(unquote(parsed.path)))
    elif scheme == "" or re.fullmatch(r"[a-z]", scheme):  # a plain path, maybe with a drive
        folder = Path(base_url).expanduser()
    else:
        raise CovidSegError(
            f"download.base_url {base_url!r} is neither an http(s) URL nor a local folder. "
            + MIRROR_HINT
        )
    if not folder.is_dir():
        raise CovidSegError(f"download.base_url: no such folder {str(folder)!r}. {MIRROR_HINT}")
    return folder


def _obtain(
    session: requests.Session,
    source: str | Path,
    name: str,
    digest: str,
    *,
    params: DownloadParams,
    cache_dir: Path,
) -> Path:
    """The verified archive `cache_dir/name`, fetched or copied only when not already there."""
    final = cache_dir / name
    if final.is_file():
        if sha256_of(final) == digest:
            log.info(f"{name}: already cached in {cache_dir}")
            return final
        log.warning(f"{name}: cached copy has the wrong sha256, fetching it again")
        final.unlink()
    part = cache_dir / f"{name}.part"
    resumed = part.is_file() and part.stat().st_size > 0 and not isinstance(source, Path)
    _fetch(session, source, name, part=part, digest=digest, params=params)
    actual = sha256_of(part)
    if actual != digest and resumed:
        # the bytes left by an earlier run were bad, not the mirror's: once more from byte 0
        log.warning(
            f"{name}: the partial download left by an earlier run was corrupt; starting again"
        )
        part.unlink()
        _fetch(session, source, name, part=part, digest=digest, params=params)
        actual = sha256_of(part)
    if actual != digest:
        part.unlink(missing_ok=True)
        raise CovidSegError(
            f"{name}: sha256 mismatch of a complete fresh download (expected {digest}, got "
            f"{actual}); the file was deleted. The mirror holds a different file, or "
            "download.sha256 in params.yaml is wrong"
        )
    os.replace(part, final)
    verb = "copied" if isinstance(source, Path) else "fetched"
    log.info(f"{name}: {verb} and verified ({final.stat().st_size:,} bytes)")
    return final


def _fetch(
    session: requests.Session,
    source: str | Path,
    name: str,
    *,
    part: Path,
    digest: str,
    params: DownloadParams,
) -> None:
    """Copy (local mirror) or download (resuming what `part` holds) one archive."""
    if isinstance(source, Path):
        _copy_local(source / name, part)
    else:
        _download(session, f"{source}/{name}", part, digest, params=params)


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _byte_bar(part: Path, total: int | None, start: int = 0) -> tqdm:
    """Progress bar in bytes (rate, ETA) named after the archive that `part` becomes."""
    return tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        leave=False,
        dynamic_ncols=True,
    )


def _copy_local(source: Path, part: Path) -> None:
    """Copy an archive from a local mirror folder into the cache."""
    if not source.is_file():
        raise CovidSegError(f"{source}: not found in the mirror folder. {MIRROR_HINT}")
    with (
        source.open("rb") as src,
        part.open("wb") as out,
        _byte_bar(part, source.stat().st_size) as bar,
    ):
        while chunk := src.read(CHUNK_BYTES):
            out.write(chunk)
            bar.update(len(chunk))


# --- HTTP: resume, retry ------------------------------------------------------------------------


def _download(
    session: requests.Session, url: str, part: Path, digest: str, *, params: DownloadParams
) -> None:
    """Download `url` into `part`, resuming what is there and retrying transient failures.

    The retry budget counts attempts that made no progress: a connection that drops again and
    again, but each time after more bytes arrived, is followed until the file is complete.
    """
    stalls = 0
    while True:
        before = _size(part)
        try:
            _request(session, url, part, digest, timeout=params.timeout_s)
            return
        except _Restart as error:
            log.warning(f"{redact(url)}: {error}; starting again from byte 0")
        except _Transient as error:
            if _size(part) > before:
                stalls = 0  # progress: the budget starts over
            elif stalls >= params.retries:
                raise _give_up(url, error, stalls) from None
            else:
                stalls += 1
            delay = params.backoff_s * 2 ** max(stalls - 1, 0)
            log.warning(
                f"{redact(url)}: {redact(error.reason)}; "
                f"retrying ({stalls}/{params.retries} without progress)"
            )
            time.sleep(delay)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _give_up(url: str, error: _Transient, attempt: int) -> CovidSegError:
    """The one-line error once the retries are spent."""
    if error.unreachable:
        return CovidSegError(f"cannot reach {url}: {error.reason}. {MIRROR_HINT}")
    tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
    return CovidSegError(
        f"downloading {url} failed after {tries} without progress: {error.reason}. {MIRROR_HINT}"
    )


def _request(
    session: requests.Session, url: str, part: Path, digest: str, *, timeout: float
) -> None:
    """One GET, resumed with `Range` when `part` already holds bytes."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as error:
        raise _Transient(_short_reason(error, timeout), unreachable=True) from None
    with response:
        start = _check_status(response, url, part, digest, have=have)
        if start is not None:
            _stream(response, part, start, timeout)


def _check_status(
    response: requests.Response, url: str, part: Path, digest: str, *, have: int
) -> int | None:
    """The offset the body starts at, or None when `part` is already complete."""
    status = response.status_code
    if status == 206:
        first = _content_range_start(response)
        if first != have:
            part.unlink(missing_ok=True)
            raise _Restart(f"server resumed at byte {first}, not {have}")
        return have
    if status == 200:
        return 0  # a 200 reply to a ranged request: the server restarts from zero
    if status == 416 and have:
        if sha256_of(part) == digest:
            return None
        part.unlink()
        raise _Restart(f"server refused to resume at byte {have} (HTTP 416)")
    if status == 404:
        raise CovidSegError(f"{url}: not found (HTTP 404). {MIRROR_HINT}")
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status} {response.reason}")
    raise CovidSegError(f"{url}: unexpected reply HTTP {status} {response.reason}. {MIRROR_HINT}")


def _content_range_start(response: requests.Response) -> int | None:
    """First byte of a 206 reply, from `Content-Range: bytes FIRST-LAST/TOTAL`."""
    match = re.match(r"bytes\s+(\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _stream(response: requests.Response, part: Path, start: int, timeout: float) -> None:
    """Write the body to `part` from `start` on, with a progress bar; a short body is transient."""
    length = response.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    with (
        part.open("r+b" if start else "wb") as out,
        _byte_bar(part, total, start) as bar,
    ):
        out.seek(start)
        out.truncate()
        while chunk := _read_chunk(response, out.tell(), timeout):
            out.write(chunk)
            bar.update(len(chunk))
        if total is not None and out.tell() < total:
            raise _Transient(f"short read: got {out.tell():,} of {total:,} bytes")


def _read_chunk(response: requests.Response, at: int, timeout: float) -> bytes:
    """The next bytes of the body; read1 keeps every byte that arrived before a drop."""
    try:
        chunk: bytes = response.raw.read1(CHUNK_BYTES)  # urllib3's response (untyped here)
        return chunk
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
        reason = _short_reason(error, timeout)
        raise _Transient(f"connection lost at byte {at:,}: {reason}") from None


def _short_reason(error: BaseException, timeout: float) -> str:
    """A few words for a requests error instead of urllib3's nested repr."""
    if isinstance(error, requests.ConnectTimeout):
        return f"connection timed out after {timeout:g} s"
    text = str(error)
    if isinstance(error, requests.Timeout) or "Read timed out" in text:
        return f"no data for {timeout:g} s"
    for marker, reason in _REASONS:
        if marker in text:
            return reason
    return f"{type(error).__name__}: {text[:200]}"


# --- extraction ----------------------------------------------------------------------------------


def _extract_all(archives: list[Path], raw_dir: Path) -> list[Path]:
    """Extract each archive into `raw_dir/<stem>/`, all or nothing."""
    with atomic_dir(raw_dir) as staging:
        for archive in archives:
            count = _extract(archive, staging / archive.name.removesuffix(".zip"))
            log.info(f"{archive.name}: extracted {count} files")
    return [raw_dir / archive.name.removesuffix(".zip") for archive in archives]


def _extract(archive: Path, dest: Path) -> int:
    """Extract one verified archive into `dest` (via a temporary sibling); the file count."""
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            for info in members:
                _check_member(archive.name, info)
            count = sum(_write_member(zipped, info, partial) for info in members)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise CovidSegError(f"{archive.name}: corrupt or truncated zip ({error})") from None
    os.replace(partial, dest)
    return count


def _check_member(archive: str, info: zipfile.ZipInfo) -> None:
    """Refuse a member that could write outside its folder: absolute, `..`, drive, symlink."""
    name = info.filename.replace("\\", "/")
    reason = None
    if stat.S_ISLNK(info.external_attr >> 16):
        reason = "a symbolic link"
    elif name.startswith("/"):
        reason = "an absolute path"
    elif re.match(r"[A-Za-z]:", name):
        reason = "a path with a drive letter"
    elif ".." in PurePosixPath(name).parts:
        reason = "a path with '..'"
    elif "\0" in name:
        reason = "a name with a NUL byte"
    if reason:
        raise CovidSegError(f"{archive}: refusing member {info.filename!r}, {reason}")


def _write_member(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path) -> int:
    """Write one checked member under `root`; 1 for a file, 0 for a folder."""
    target = root.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipped.open(info) as source, target.open("wb") as out:
        shutil.copyfileobj(source, out, CHUNK_BYTES)
    return 1
