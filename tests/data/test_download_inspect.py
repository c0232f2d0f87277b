"""`gesr data download` against a local HTTP server, and `gesr data inspect` output."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
import os
import threading
import zipfile

import pytest

from gesr_jax.data import commands, download
from movielens_fixtures import random_log, write_100k, write_dat


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def served(tmp_path):
    """A zip named ml-100k.zip of a small 100k-format folder, served on 127.0.0.1; yields (base_url, sha256)."""
    site = tmp_path / "site"
    site.mkdir()
    folder = write_100k(tmp_path / "src" / "ml-100k", random_log())
    archive = site / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"ml-100k/{path.name}")
    (site / "ml-1m.zip").write_bytes(b"this is not a zip")
    (site / "ml-10m.zip").write_bytes(archive.read_bytes())  # served cut short, see _QuietHandler
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)  # the server never outlives a stuck test by long
    watchdog.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.sha256(archive.read_bytes()).hexdigest()
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder; ml-10m.zip announces its full Content-Length but the body stops halfway."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def copyfile(self, source, outputfile):
        if self.path.endswith("/ml-10m.zip"):
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_checks_the_hash_and_unpacks(served, tmp_path, capsys):
    base_url, sha = served
    dest = tmp_path / "datasets"
    code = commands.main(["download", "ml-100k", "--to", str(dest), "--base-url", base_url, "--sha256", sha.upper()])
    assert code == 0
    assert _leftovers(dest) == ["ml-100k"]
    assert (dest / "ml-100k" / "u.data").is_file()
    assert sha in capsys.readouterr().err
    # The unpacked folder loads as MovieLens.
    assert commands.main(["inspect", "--path", str(dest / "ml-100k")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "100k"
    # A second download does not overwrite what is there.
    with pytest.raises(download.DownloadError, match="already exists"):
        download.download("ml-100k", dest, sha256=sha, base_url=base_url, log=lambda m: None)
    assert _leftovers(dest) == ["ml-100k"]


def test_wrong_hash_fails_and_leaves_nothing(served, tmp_path, capsys):
    base_url, sha = served
    dest = tmp_path / "datasets"
    wrong = "0" * 64
    code = commands.main(["download", "ml-100k", "--to", str(dest), "--base-url", base_url, "--sha256", wrong])
    err = capsys.readouterr().err
    assert code == 1
    assert f"sha256 mismatch for {base_url}/ml-100k.zip: expected {wrong}, got {sha}" in err
    assert _leftovers(dest) == []


def test_unpinned_hash_needs_an_explicit_choice(served, tmp_path):
    base_url, sha = served
    dest = tmp_path / "datasets"
    assert download.REGISTRY["ml-100k"][1] is None
    with pytest.raises(download.DownloadError, match="--sha256 HASH .* or --no-verify"):
        download.download("ml-100k", dest, base_url=base_url, log=lambda m: None)
    assert _leftovers(dest) == []
    messages = []
    path = download.download("ml-100k", dest, verify=False, base_url=base_url, log=messages.append)
    assert path == dest / "ml-100k" and any(sha in m for m in messages)


def test_download_errors_are_clear(served, tmp_path):
    base_url, _ = served
    dest = tmp_path / "datasets"
    quiet = dict(verify=False, base_url=base_url, log=lambda m: None)
    with pytest.raises(download.DownloadError, match="not a valid zip"):
        download.download("ml-1m", dest, **quiet)
    with pytest.raises(download.DownloadError, match="could not download .*ml-25m.zip"):
        download.download("ml-25m", dest, **quiet)
    with pytest.raises(download.DownloadError, match="unknown dataset 'ml-2m'"):
        download.download("ml-2m", dest, **quiet)
    with pytest.raises(download.DownloadError, match="not a 64-digit hex"):
        download.download("ml-100k", dest, sha256="abc", base_url=base_url, log=lambda m: None)
    assert _leftovers(dest) == []


def test_inspect_reports_counts_and_skipped_users(tmp_path, capsys):
    log = random_log(seed=4)
    root = write_dat(tmp_path / "ml", log)
    assert commands.main(["inspect", "--path", str(root), "--requests", "--set", "data.num_positives=10"]) == 0
    report = json.loads(capsys.readouterr().out)
    per_user = {u: int((log.user == u).sum()) for u in set(log.user.tolist())}
    assert report["format"] == "dat"
    assert report["ratings"] == log.user.size and report["users"] == log.num_users
    assert report["items"] == len(set(log.item.tolist()))
    assert report["first_timestamp"] == log.timestamp.min() and report["last_timestamp"] == log.timestamp.max()
    expected_skipped = sum(n < 4 + 10 for n in per_user.values())
    assert report["skipped_users"] == expected_skipped > 0
    assert report["requests"]["skipped_users"] >= expected_skipped
    # Every user with a request is counted once, whichever split (global time) its requests fell in.
    assert report["requests"]["users_with_requests"] == log.num_users - report["requests"]["skipped_users"]


def test_inspect_bad_input_exits_nonzero(tmp_path, capsys):
    # Issue 24: bad data or settings are usage errors, exit code 2 (not 1, which the CLI uses for divergence).
    assert commands.main(["inspect", "--path", str(tmp_path)]) == 2
    assert "not a MovieLens folder" in capsys.readouterr().err
    root = write_dat(tmp_path / "ml", random_log())
    assert commands.main(["inspect", "--path", str(root), "--set", "data.history_lenn=3"]) == 2
    assert "unknown config key 'history_lenn'" in capsys.readouterr().err


@pytest.mark.movielens
def test_inspect_shared_movielens(shared_data, capsys):
    assert commands.main(["inspect", "--path", str(shared_data / "ml-100k")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ratings"], report["users"], report["items"]) == (100000, 943, 1682)
    assert (report["first_timestamp"], report["last_timestamp"]) == (874724710, 893286638)
    assert report["skipped_users"] == 0
    assert commands.main(["inspect", "--path", str(shared_data / "ml-1m")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["ratings"], report["users"]) == ("dat", 487650, 2999)
    assert report["directors"] > 2000 and report["user_features"] == ["age", "gender", "occupation"]


def test_a_body_cut_short_is_reported_as_incomplete(served, tmp_path):
    base_url, _ = served
    dest = tmp_path / "datasets"
    size = (tmp_path / "site" / "ml-10m.zip").stat().st_size
    with pytest.raises(download.DownloadError, match=rf"incomplete download: got {size // 2} of {size} bytes from "):
        download.download("ml-10m", dest, verify=False, base_url=base_url, log=lambda m: None)
    assert _leftovers(dest) == []


def test_partial_folders_of_killed_runs_are_removed_but_live_ones_kept(served, tmp_path):
    base_url, sha = served
    dest = tmp_path / "datasets"
    killed = dest / ".ml-100k-partial-abc123"  # what a SIGKILL-ed run leaves (older runs had no .lock)
    (killed / "unpacked").mkdir(parents=True)
    (killed / "ml-100k.zip").write_bytes(b"half")
    live = dest / ".ml-1m-partial-xyz"  # a download still running in another process
    live.mkdir()
    fd = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file description: counts as another holder
    other = dest / "my-notes"  # not ours: never touched
    other.mkdir()
    messages = []
    try:
        download.download("ml-100k", dest, sha256=sha, base_url=base_url, log=messages.append, progress=False)
    finally:
        os.close(fd)
    assert _leftovers(dest) == [".ml-1m-partial-xyz", "ml-100k", "my-notes"]
    assert any(f"removed {killed}, a partial download" in m for m in messages)
    assert download.remove_partial_downloads(dest) == [live]  # once its holder is gone


def test_progress_bar_on_a_terminal_log_lines_otherwise(served, tmp_path, capsys):
    base_url, sha = served
    size = (tmp_path / "site" / "ml-100k.zip").stat().st_size
    messages = []
    download.download("ml-100k", tmp_path / "a", sha256=sha, base_url=base_url, log=messages.append, progress=False)
    assert capsys.readouterr().err == ""
    assert messages[0].startswith("downloading ") and f"downloaded {size} bytes; sha256 {sha}" in messages[1]
    download.download("ml-100k", tmp_path / "b", sha256=sha, base_url=base_url, log=lambda m: None, progress=True)
    bar = capsys.readouterr().err
    assert "ml-100k.zip" in bar and "100%" in bar
