"""Helpers of the download tests: a real HTTP server on 127.0.0.1, configs, snapshots, archives.

The fixtures ``isolated`` (autouse), ``tiny`` and ``published`` serve the modules that import
them: pytest finds a fixture among a test module's names.
"""

from __future__ import annotations

import collections
import contextlib
import io
import shutil
import ssl
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from neu_model.core.config import DATA_SOURCE_ENV, load_config
from neu_model.core.paths import PARAMS_FILE, ROOT
from neu_model.data import download as dl

FIXTURE = ROOT / "tests" / "fixtures" / "NEU-tiny"
FAST = (0.01, 0.01, 0.01)  # retry delays: keep the tests fast
KAGGLE = {"Cr": "train/Crazing", "In": "valid/Inclusion", "Pa": "test/Patches",
          "PS": "train/Pitted", "RS": "test/Rolled-in_scale", "Sc": "valid/Scratches"}
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class Hits(collections.Counter):
    """Requests per path, plus the Authorization header of each request (None when absent)."""

    def __init__(self):
        super().__init__()
        self.auth: list[str | None] = []


@pytest.fixture(autouse=True, name="isolated")
def isolated_work_dir(tmp_path: Path, monkeypatch) -> None:
    """Work in tmp_path, with no data-source override and no proxy for 127.0.0.1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_SOURCE_ENV, raising=False)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@contextlib.contextmanager
def serve(files, fail_first=None, cut_first=None, *, stall=None, content_type=None, password=None,
          redirect=None, host="127.0.0.1", tls=None):
    """Serve ``files`` ({"/path": bytes}) on 127.0.0.1; unknown paths get 404.

    ``fail_first[path] = n`` answers 500 to the first n requests of ``path``;
    ``cut_first[path] = n`` sends only half the body (closing early) the first n times;
    ``stall`` ("headers" or "body") sends the headers (and half the body), then nothing until
    the server stops; ``content_type`` is sent as Content-Type; ``password`` makes every path
    answer 401 without Basic credentials of user ``ci`` and that password; ``redirect[path] =
    url`` answers 302 to ``url``; ``tls`` = (certificate, key) files serves https.
    Yields the base URL and the Hits.
    """
    fail_first, cut_first = dict(fail_first or {}), dict(cut_first or {})
    hits, release = Hits(), threading.Event()
    expected_auth = None
    if password is not None:
        import base64

        expected_auth = "Basic " + base64.b64encode(f"ci:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            hits[self.path] += 1
            hits.auth.append(self.headers.get("Authorization"))
            if expected_auth and self.headers.get("Authorization") != expected_auth:
                self.send_error(401)
            elif self.path in (redirect or {}):
                self.send_response(302)
                self.send_header("Location", redirect[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path not in files:
                self.send_error(404)
            elif hits[self.path] <= fail_first.get(self.path, 0):
                self.send_error(500)
            else:
                self._send(files[self.path], cut=hits[self.path] <= cut_first.get(self.path, 0))

        def _send(self, body, cut):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            if content_type:
                self.send_header("Content-Type", content_type)
            self.end_headers()
            if stall:
                self.wfile.write(body[: len(body) // 2] if stall == "body" else b"")
                self.wfile.flush()
                release.wait()
                return
            self.wfile.write(body[: len(body) // 2] if cut else body)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = QuietServer((host, 0), Handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*map(str, tls))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{server.server_port}", hits
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gives up mid-answer (a refused download) is what the tests provoke


def cfg(source, *extra):
    return load_config(PARAMS_FILE, [f"data.source={source}", "data.expected_per_class=any", *extra])


def copy_fixture(dest: Path) -> Path:
    """A writable copy of the 30-image fixture (5 per class) at ``dest``."""
    dest.mkdir(parents=True)
    for f in FIXTURE.iterdir():
        shutil.copyfile(f, dest / f.name)
    return dest


@pytest.fixture(name="tiny")
def tiny_source(tmp_path: Path) -> Path:
    """A writable copy of the fixture at tmp_path/src, in the flat NEU-CLS layout."""
    return copy_fixture(tmp_path / "src")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(name="published")
def published_raw(tmp_path: Path) -> dict[str, bytes]:
    """A good data/raw published from a separate copy of the fixture; returns its snapshot."""
    good = tmp_path / "good"
    shutil.copytree(FIXTURE, good)
    dl.download(cfg(good))
    before = snapshot(Path("data/raw"))
    assert len(before) == 32  # 30 images, manifest, labels.json
    return before


def assert_unchanged(before):
    assert snapshot(Path("data/raw")) == before
    leftovers = [p.name for p in Path("data").iterdir() if p.name not in ("raw", "cache")]
    assert leftovers == []  # no .raw-tmp-* or .raw.old left behind


def kaggle_zip(src: Path, dest: Path) -> Path:
    """Kaggle's layout inside a GitHub-style top folder, with the junk such archives carry."""
    top = "repo-2a1e01d/NEU Metal Surface Defects Data"
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(src.iterdir()):
            cls = f.name.split("_")[0]
            # A non-canonical name: the class and number come from the folder and the digits.
            name = "scan 5.bmp" if f.name == "RS_5.bmp" else f.name
            zf.write(f, f"{top}/{KAGGLE[cls]}/{name}")
        buf = io.BytesIO()
        Image.new("RGB", (64, 48)).save(buf, "PNG")
        zf.writestr("repo-2a1e01d/Model Loss.png", buf.getvalue())  # a plot: no class, skipped
        zf.writestr("repo-2a1e01d/README.md", "readme")
        zf.writestr(f"{top}/train/Crazing/.DS_Store", b"junk")
        zf.writestr("__MACOSX/repo-2a1e01d/._Cr_1.bmp", b"junk")
    return dest
