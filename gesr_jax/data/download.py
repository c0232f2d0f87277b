"""Fetch an official MovieLens zip, check its sha256 and unpack it.

GroupLens serves each dataset as ``https://files.grouplens.org/datasets/movielens/NAME.zip``.
:data:`REGISTRY` pins a sha256 only where one could be verified. None could be from where this
package was written (no network access, and GroupLens publishes md5 files, not sha256), so
every entry is ``None`` today. An entry without a hash needs ``sha256=`` (a hash you trust) or
``verify=False`` (``--no-verify``), which still prints the computed hash so it can be pinned.

Nothing half-done is left behind: the zip is streamed to a temporary file next to the target,
unpacked into a temporary folder, and only renamed into place once hash and archive are good.
"""

from __future__ import annotations

import hashlib
import pathlib
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable

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
) -> pathlib.Path:
    """Download dataset ``name`` into folder ``to`` and return the unpacked dataset folder.

    ``base_url`` replaces the GroupLens address (the zip is fetched from ``{base_url}/{name}.zip``),
    e.g. for a mirror or a test server. ``sha256`` overrides the registry's hash.
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
    with tempfile.TemporaryDirectory(dir=target_root, prefix=f".{name}-partial-") as scratch:
        archive = pathlib.Path(scratch) / f"{name}.zip"
        log(f"downloading {url}")
        digest = _fetch(url, archive, timeout)
        log(f"sha256 {digest}  {name}.zip")
        if expected is not None and digest != expected:
            raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, got {digest}; nothing was kept")
        unpacked = pathlib.Path(scratch) / "unpacked"
        top = _extract(archive, unpacked, name)
        final = target_root / top.name
        if final.exists():
            raise DownloadError(f"{final} already exists; remove it or pick another --to")
        top.rename(final)
    log(f"unpacked into {final}")
    return final


def _fetch(url: str, dest: pathlib.Path, timeout: float) -> str:
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                sha.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"could not download {url}: {err}") from None
    return sha.hexdigest()


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
