"""Fetch an official MovieLens zip, check its sha256 and unpack it.

GroupLens serves each dataset as ``https://files.grouplens.org/datasets/movielens/NAME.zip``.
:data:`REGISTRY` pins a sha256 only where one could be verified. None could be from where this
package was written (no network access, and GroupLens publishes md5 files, not sha256), so
every entry is ``None`` today. An entry without a hash needs ``sha256=`` (a hash you trust) or
``verify=False`` (``--no-verify``), which still prints the computed hash so it can be pinned.

Nothing half-done is left behind: the zip is streamed into a hidden ``.NAME-partial-*`` folder next to
the target, checked (byte count against ``Content-Length`` when the server sends one, so a body cut short
is reported as incomplete rather than as a bad zip; then the sha256), unpacked there, and only renamed
into place once everything is good. The partial folder is removed on any failure; one left by a killed
run is removed at the start of the next download into the same folder. A live download holds an
``flock`` on ``.lock`` inside its partial folder, so a concurrent download into the same place keeps it.

Progress: a tqdm bar on stderr when it is a terminal, otherwise one log line before and one after.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pathlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable

import tqdm

OFFICIAL_BASE_URL = "https://files.grouplens.org/datasets/movielens"
# name -> (url, sha256 or None). Add a hash only after checking it against a copy you trust.
REGISTRY: dict[str, tuple[str, str | None]] = {
    name: (f"{OFFICIAL_BASE_URL}/{name}.zip", None)
    for name in ("ml-100k", "ml-1m", "ml-10m", "ml-latest-small", "ml-20m", "ml-25m", "ml-32m")
}
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed, its hash did not match, or the archive is unusable."""


def download(
    name: str,
    to: str | pathlib.Path,
    *,
    sha256: str | None = None,
    verify: bool = True,
    base_url: str | None = None,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> pathlib.Path:
    """Download dataset ``name`` into folder ``to`` and return the unpacked dataset folder.

    ``base_url`` replaces the GroupLens address (the zip is fetched from ``{base_url}/{name}.zip``),
    e.g. for a mirror or a test server. ``sha256`` overrides the registry's hash. ``progress``: show a
    tqdm bar (default: when stderr is a terminal); without one, ``log`` gets a line before and after.
    """
    if name not in REGISTRY:
        raise DownloadError(f"unknown dataset {name!r}; known: {sorted(REGISTRY)}")
    url, pinned = REGISTRY[name]
    if base_url:
        url = f"{base_url.rstrip('/')}/{name}.zip"
    expected = (sha256 or pinned or "").strip().lower() or None
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise DownloadError(f"--sha256 {sha256!r} is not a 64-digit hex sha256")
    if verify and expected is None:
        raise DownloadError(
            f"no verified sha256 is pinned for {name}: pass --sha256 HASH (from a copy you trust) or "
            "--no-verify to accept whatever the server sends (its sha256 is printed so you can pin it)"
        )
    target_root = pathlib.Path(to).expanduser()
    target_root.mkdir(parents=True, exist_ok=True)
    for stale in remove_partial_downloads(target_root):
        log(f"removed {stale}, a partial download left by an earlier run")
    if progress is None:
        progress = sys.stderr.isatty()
    with _partial_folder(target_root, name) as scratch:
        archive = scratch / f"{name}.zip"
        log(f"downloading {url}")
        digest, size = _fetch(url, archive, timeout, progress)
        log(f"downloaded {size} bytes; sha256 {digest}  {name}.zip")
        if expected is not None and digest != expected:
            raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {digest}; nothing was kept")
        unpacked = scratch / "unpacked"
        top = _extract(archive, unpacked, name)
        final = target_root / top.name
        if final.exists():
            raise DownloadError(f"{final} already exists; remove it or pick another --to")
        top.rename(final)
    log(f"unpacked into {final}")
    return final


def _partial_prefix(name: str) -> str:
    return f".{name}-partial-"


@contextlib.contextmanager
def _partial_folder(target_root: pathlib.Path, name: str):
    """A hidden scratch folder in ``target_root``, flock-ed while in use and removed afterwards, whatever happens."""
    scratch = pathlib.Path(tempfile.mkdtemp(dir=target_root, prefix=_partial_prefix(name)))
    try:
        fd = os.open(scratch / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # a filesystem without locks: cleanup just cannot tell
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield scratch
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_partial_downloads(target_root: str | pathlib.Path) -> list[pathlib.Path]:
    """Remove the ``.NAME-partial-*`` folders of killed downloads in ``target_root``; return what was removed.

    A folder whose ``.lock`` another process holds is a download in progress and is kept.
    """
    removed = []
    for name in REGISTRY:
        for folder in sorted(pathlib.Path(target_root).glob(_partial_prefix(name) + "*")):
            if not folder.is_dir() or _in_use(folder):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _in_use(folder: pathlib.Path) -> bool:
    try:
        fd = os.open(folder / ".lock", os.O_RDWR)
    except OSError:  # no lock file: an older version's folder, or killed before it made one
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock just taken
    return False


def _fetch(url: str, dest: pathlib.Path, timeout: float, progress: bool) -> tuple[str, int]:
    """Stream ``url`` into ``dest``; return (sha256, bytes). A body shorter than Content-Length is an error."""
    sha = hashlib.sha256()
    got, expected = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm.tqdm(
                total=expected, desc=dest.name, unit="B", unit_scale=True, disable=not progress, file=sys.stderr
            ) as bar:
                # http.client returns b"" (no error) when the connection closes early, hence the count.
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    sha.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except http.client.IncompleteRead as err:
        got += len(err.partial)
        raise DownloadError(_incomplete(url, got, expected)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        so_far = f" after {got} of {expected if expected is not None else '?'} bytes" if got else ""
        raise DownloadError(f"could not download {url}{so_far}: {err}") from None
    if expected is not None and got != expected:
        raise DownloadError(_incomplete(url, got, expected))
    return sha.hexdigest(), got


def _incomplete(url: str, got: int, expected: int | None) -> str:
    total = expected if expected is not None else "an unknown number of"
    return (
        f"incomplete download: got {got} of {total} bytes from {url} (the connection closed early); nothing "
        "was kept, try again"
    )


def _extract(archive: pathlib.Path, dest: pathlib.Path, name: str) -> pathlib.Path:
    """Unpack into ``dest``; return the dataset folder (the zip's single top folder, else ``dest/name``)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if not m.startswith("__MACOSX/")]
            for member in members:
                parts = pathlib.PurePosixPath(member).parts
                if member.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise DownloadError(f"{archive.name} holds an unsafe path {member!r}; refusing to unpack")
            if not members:
                raise DownloadError(f"{archive.name} is empty")
            tops = {pathlib.PurePosixPath(m).parts[0] for m in members}
            single_folder = len(tops) == 1 and all("/" in m for m in members)
            root = dest if single_folder else dest / name
            zf.extractall(root, members=members)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive.name} is not a valid zip archive: {err}") from None
    return dest / tops.pop() if single_folder else root


def sha256_of(path: str | pathlib.Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()
