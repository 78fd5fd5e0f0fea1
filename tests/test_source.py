"""The source stage: fingerprints of folders and of URLs (a real server on 127.0.0.1), offline runs, credentials."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from neu_model.core.config import DATA_SOURCE_ENV
from neu_model.core.paths import ROOT
from neu_model.data.source import record_source, redact

from conftest import FIXTURE_IMAGES, make_project, run_in_project

BODY = b"PK" + bytes(998)  # what the server serves; only its headers matter here


@contextlib.contextmanager
def archive_server(**state):
    """Serve BODY at any path on 127.0.0.1 with the ETag and Last-Modified in ``state`` (changeable
    while it runs). ``refuse_head`` answers HEAD with 405; ``password`` demands basic auth
    ``user:password``; ``redirect_to`` answers 302 to that URL. Yields (base URL, state, requests seen)."""
    state = {"etag": '"v1"', "last_modified": "Mon, 01 Jan 2024 00:00:00 GMT", **state}
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, with_body: bool) -> None:
            seen.append({"method": self.command, "path": self.path, **self.headers})
            if state.get("redirect_to"):
                self.send_response(302)
                self.send_header("Location", state["redirect_to"])
                self.end_headers()
                return
            expected = base64.b64encode(f"user:{state.get('password')}".encode()).decode()
            if state.get("password") and self.headers.get("Authorization") != f"Basic {expected}":
                self.send_error(401)
                return
            ranged = self.headers.get("Range") == "bytes=0-0"
            body = BODY[:1] if ranged else BODY
            self.send_response(206 if ranged else 200)
            if ranged:
                self.send_header("Content-Range", f"bytes 0-0/{len(BODY)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", state["etag"])
            self.send_header("Last-Modified", state["last_modified"])
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            if state.get("refuse_head"):
                seen.append({"method": "HEAD", "path": self.path})
                self.send_error(405)
                return
            self._answer(with_body=False)

        def do_GET(self):  # noqa: N802
            self._answer(with_body=True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", state, seen
    finally:
        server.shutdown()
        server.server_close()


def source_stage(url: str, out: Path) -> subprocess.CompletedProcess:
    """``python -m neu_model.data.source`` as dvc runs it, with ``url`` as data.source."""
    # in out's folder, every output beside out: nothing lands in the checkout's data/
    return subprocess.run([sys.executable, "-m", "neu_model.data.source", "--params", str(ROOT / "params.yaml"),
                           "--set", f"data.source={url}", "--out", str(out), "--timeout", "3",
                           "--boxes-out", str(out.with_name("boxes_source.json")),
                           "--labels-out", str(out.with_name("labels_source.json"))],
                          cwd=out.parent, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})


def keep_time(path: Path) -> int:
    """Set ``path``'s modification time to a fixed old value and return it, so a rewrite shows."""
    os.utime(path, ns=(10**18, 10**18))
    return path.stat().st_mtime_ns


# ---------------------------------------------------------------- local folders

def test_new_image_in_a_folder_changes_the_fingerprint_and_nothing_else_rewrites_it(tmp_path):
    source, out = tmp_path / "NEU-CLS", tmp_path / "data" / "source.json"
    shutil.copytree(FIXTURE_IMAGES, source)
    assert record_source(str(source), out)
    first = json.loads(out.read_text())
    assert first["source"] == str(source) and len(first["sha256"]) == 64
    mtime = keep_time(out)
    assert not record_source(str(source), out)
    assert out.stat().st_mtime_ns == mtime  # unchanged folder: the file is not even rewritten
    shutil.copy(source / "Cr_1.bmp", source / "Cr_6.bmp")
    assert record_source(str(source), out)
    assert json.loads(out.read_text())["sha256"] != first["sha256"]


def test_missing_folder_is_a_one_line_error_naming_it(tmp_path):
    result = source_stage(str(tmp_path / "nowhere"), tmp_path / "source.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: data source not found; set data.source in params.yaml or NEU_DATA_SOURCE")
    assert not (tmp_path / "source.json").exists()


# ---------------------------------------------------------------- URLs

def test_url_fingerprint_is_what_the_server_says_about_the_content(tmp_path):
    out = tmp_path / "source.json"
    with archive_server() as (base, state, seen):
        url = f"{base}/neu.zip"
        assert record_source(url, out)
        first = json.loads(out.read_text())
        assert first == {"source": url, "etag": '"v1"', "last_modified": state["last_modified"],
                         "content_length": str(len(BODY))}
        assert [r["method"] for r in seen] == ["HEAD"]  # the archive itself is not fetched
        mtime = keep_time(out)
        assert not record_source(url, out)  # same ETag: unchanged, not rewritten
        assert out.stat().st_mtime_ns == mtime
        state["etag"] = '"v2"'  # new data at the same URL
        assert record_source(url, out)
        assert json.loads(out.read_text())["etag"] == '"v2"'


def test_refused_head_falls_back_to_a_one_byte_get(tmp_path):
    out = tmp_path / "source.json"
    with archive_server(refuse_head=True) as (base, _, seen):
        assert record_source(f"{base}/neu.zip", out)
    record = json.loads(out.read_text())
    assert record["etag"] == '"v1"' and record["content_length"] == str(len(BODY))  # the whole length
    assert [(r["method"], r.get("Range")) for r in seen] == [("HEAD", None), ("GET", "bytes=0-0")]


def test_a_definite_no_from_the_server_changes_the_fingerprint(tmp_path):
    out = tmp_path / "source.json"
    with archive_server(password="right") as (base, _, _):
        assert record_source(f"http://user:wrong@{base.partition('://')[2]}/neu.zip", out)
    assert json.loads(out.read_text())["http_status"] == "401"  # so that the download stage runs and says why


@pytest.mark.slow
def test_server_gone_keeps_the_last_fingerprint_and_exits_0(tmp_path):
    out = tmp_path / "source.json"
    with archive_server() as (base, _, _):
        url = f"{base}/neu.zip"
        assert source_stage(url, out).returncode == 0
    before, mtime = out.read_bytes(), keep_time(out)
    offline = source_stage(url, out)
    assert offline.returncode == 0, offline.stderr
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    notes = [ln for ln in offline.stderr.splitlines() if "not reached" in ln]
    assert len(notes) == 1 and "keeping the last fingerprint" in notes[0] and url in notes[0]


def test_server_gone_and_no_fingerprint_yet_falls_back_to_the_url(tmp_path, caplog):
    out = tmp_path / "source.json"
    with archive_server() as (base, _, _):
        url = f"{base}/neu.zip"
    with caplog.at_level(logging.WARNING, logger="neu_model.data.source"):
        assert record_source(url, out, timeout=3)
    assert json.loads(out.read_text()) == {"source": url}
    assert "no earlier fingerprint" in caplog.text


def test_credentials_are_sent_but_never_written_or_logged(tmp_path, caplog):
    out = tmp_path / "source.json"
    with caplog.at_level(logging.INFO, logger="neu_model.data.source"):
        with archive_server(password="s3cret-token") as (base, _, seen):
            host = base.partition("://")[2]
            url = f"http://user:s3cret-token@{host}/neu.zip"
            assert record_source(url, out)
        assert record_source(url, out, timeout=3) is False  # server gone: the note names the URL too
    assert seen[0]["Authorization"].startswith("Basic ")
    record = json.loads(out.read_text())
    assert record["source"] == f"http://***@{host}/neu.zip" and record["etag"] == '"v1"'
    assert "s3cret" not in out.read_text() and "s3cret" not in caplog.text
    assert f"http://***@{host}/neu.zip" in caplog.text


def test_redirect_keeps_head_and_drops_credentials_at_another_host(tmp_path):
    with archive_server() as (target, _, seen_target):
        # "localhost" is another host name for the same machine: the credentials must stay behind.
        other = target.replace("127.0.0.1", "localhost") + "/moved.zip"
        with archive_server(redirect_to=other) as (base, _, seen_first):
            assert record_source(f"http://user:pw@{base.partition('://')[2]}/neu.zip", tmp_path / "source.json")
    assert seen_first[0]["Authorization"] and seen_first[0]["method"] == "HEAD"
    assert [(r["method"], r["path"], "Authorization" in r) for r in seen_target] == [("HEAD", "/moved.zip", False)]


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:token@example.com/a.zip", "https://***@example.com/a.zip"),
    ("https://token@example.com:8443/a.zip?x=1", "https://***@example.com:8443/a.zip?x=1"),
    ("https://example.com/a@b.zip", "https://example.com/a@b.zip"),
    ("/data/NEU-CLS", "/data/NEU-CLS"),
])
def test_redact(url, shown):
    assert redact(url) == shown


# ---------------------------------------------------------------- in a DVC project

@pytest.mark.slow
def test_dvc_repro_downloads_again_only_when_an_image_was_added(tmp_path):
    project = make_project(tmp_path / "project")
    source = tmp_path / "NEU-CLS"
    shutil.copytree(FIXTURE_IMAGES, source)
    dvc = str(Path(sys.executable).parent / "dvc")

    def repro() -> str:
        result = run_in_project([dvc, "repro", "source", "download"], project, **{DATA_SOURCE_ENV: str(source)})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert "Running stage 'download'" in repro()
    mtime = keep_time(project / "data" / "source.json")
    unchanged = repro()
    assert "Running stage 'source'" in unchanged and "Stage 'download' didn't change, skipping" in unchanged
    # persist: DVC left the file for the stage to compare with, and the stage left it alone
    assert (project / "data" / "source.json").stat().st_mtime_ns == mtime
    status = run_in_project([dvc, "status", "--json", "source", "download"], project,
                            **{DATA_SOURCE_ENV: str(source)})
    assert json.loads(status.stdout) == {"source": ["always changed"]}  # always_changed; nothing else to do
    shutil.copy(source / "Cr_1.bmp", source / "Cr_6.bmp")
    assert "Running stage 'download'" in repro()
    assert "Cr_6.bmp" in (project / "data" / "raw" / "manifest.csv").read_text()
