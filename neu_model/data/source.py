"""The ``source`` stage: fingerprint the data and box sources so that ``dvc repro`` notices new ones.

The images (``data.source`` or ``NEU_DATA_SOURCE``) and NEU-DET's boxes (``data.boxes`` or
``NEU_BOXES_SOURCE``) live outside the repository and may be chosen by an environment
variable, which DVC cannot see, so dvc.yaml runs this stage on every ``dvc repro``
(``always_changed``): the one process a no-op ``dvc repro`` starts. It writes
``data/source.json`` (the images) and ``data/boxes_source.json`` (the boxes) only when their
fingerprint changed; the download stage depends on the first and the boxes stage on the
second, so DVC runs each, and everything after it, exactly when there is something new. The
plant's labelled images (``data.labels``, the folder ``neu-review commit`` writes) get
``data/labels_source.json`` the same way, a dependency of download: a commit of labels makes
``dvc repro`` run from download, no commit runs nothing.

- A folder or archive: a hash of every byte (and file name) in it.
- An http(s) URL: what the server says about the content (``ETag``, ``Last-Modified``,
  ``Content-Length``) from a HEAD request, or from a one-byte ranged GET when HEAD is
  refused. A server that cannot be reached leaves the last fingerprint as it is (a note
  says so), so that a no-op ``dvc repro`` works offline.

Credentials in a URL (``https://user:token@host/...``) are sent as HTTP basic auth and never
written to data/source.json or the log: they appear as ``https://***@host/...`` (and secret
query parameters of a signed URL as ``***``: ``neu_model.core.redact``).

    python -m neu_model.data.source
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import logging
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from neu_model.core.config import add_config_args, load_config
from neu_model.core.files import write_json
from neu_model.core.paths import BOXES_SOURCE_FILE, LABELS_SOURCE_FILE, SOURCE_FILE
from neu_model.core.redact import redact_url as redact  # the one implementation: credentials and signed-URL secrets
from neu_model.core.stage import StageError, run_stage

log = logging.getLogger("neu_model.data.source")

# What a source is called in an error, and where it is set.
DATA_SETTING = ("data source", "data.source in params.yaml or NEU_DATA_SOURCE")
BOXES_SETTING = ("box source", "data.boxes in params.yaml or NEU_BOXES_SOURCE")
LABELS_SETTING = ("labelled-image folder", "data.labels in params.yaml")
# Seconds to wait for the server: an unreachable one must not hold up a no-op `dvc repro`.
PROBE_TIMEOUT = 5.0
# What the server's answer becomes in data/source.json.
CONTENT_HEADERS = {"ETag": "etag", "Last-Modified": "last_modified", "Content-Length": "content_length"}


class Unreachable(Exception):
    """The server could not be reached, or answered that it is in trouble (5xx, 408, 429)."""


def is_url(source: str) -> bool:
    return re.match(r"^https?://", source, re.IGNORECASE) is not None


def folder_fingerprint(source: str, setting: tuple[str, str] = DATA_SETTING) -> dict[str, str]:
    """A content hash of a local folder or archive.

    Hashing every byte of a 74 MB folder takes well under a second, and unlike modification
    times it is the same on every copy of the same data.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise StageError(f"{source}: {setting[0]} not found; set {setting[1]}")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return {"source": source, "sha256": digest.hexdigest()}


class _SameMethodRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects keeping the method (urllib turns a HEAD into a GET) and never sending
    the credentials on to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()
            if urllib.parse.urlsplit(newurl).hostname != urllib.parse.urlsplit(req.full_url).hostname:
                new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_SameMethodRedirect)


def _request(url: str, method: str, extra_headers: dict[str, str]) -> urllib.request.Request:
    """A request for ``url`` with its ``user:password@`` moved into a basic-auth header (urllib
    would take it for part of the host name)."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "neu-model-source", **extra_headers}
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return urllib.request.Request(url, method=method, headers=headers)


def _answer(url: str, method: str, timeout: float, extra_headers: dict[str, str]) -> dict[str, str]:
    """The content headers of the server's answer; the body is never read (closed at once)."""
    with _opener.open(_request(url, method, extra_headers), timeout=timeout) as resp:
        found = {key: resp.headers[name] for name, key in CONTENT_HEADERS.items() if resp.headers.get(name)}
        # A ranged answer (206) says the whole length after the slash: "bytes 0-0/76543210".
        whole = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
        if resp.status == 206:
            found.pop("content_length", None)
            if whole.isdigit():
                found["content_length"] = whole
        return found


def probe(url: str, timeout: float = PROBE_TIMEOUT) -> dict[str, str]:
    """What the server says about the content at ``url``: those of ETag, Last-Modified and
    Content-Length it sends, or ``{"http_status": "404"}`` for a definite "no".

    A HEAD first; servers that refuse it (405, 501; 403 for URLs signed for GET only) are asked
    for the first byte with a ranged GET, whose connection is closed without reading on.

    Raises:
        Unreachable: no connection, a timeout, or a server error (5xx, 408, 429).
    """
    try:
        return _answer(url, "HEAD", timeout, {})
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise Unreachable(_reason(exc)) from None
    try:
        return _answer(url, "GET", timeout, {"Range": "bytes=0-0"})
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise Unreachable(f"HTTP {exc.code} {exc.reason}") from None
        # The download stage will fail on it too, naming the fix; changing the fingerprint makes it run.
        return {"http_status": str(exc.code)}
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise Unreachable(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", None) or exc) or exc.__class__.__name__


def _previous(out: Path) -> dict | None:
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return None


def url_fingerprint(url: str, previous: dict | None, timeout: float = PROBE_TIMEOUT) -> dict[str, str]:
    """The fingerprint of ``url`` from the server's answer; ``previous`` when the server cannot be
    reached and it is this URL's, else the URL alone."""
    shown = redact(url)
    try:
        answer = probe(url, timeout)
    except Unreachable as reason:
        if previous and previous.get("source") == shown:
            log.warning("data source %s not reached (%s): keeping the last fingerprint", shown, reason)
            return previous
        log.warning("data source %s not reached (%s) and no earlier fingerprint: the URL alone stands for "
                    "the data until the server answers", shown, reason)
        return {"source": shown}
    if not answer:
        log.warning("data source %s: the server sends no ETag, Last-Modified or Content-Length, so new data "
                    "at this same URL goes unnoticed; change the URL to get it", shown)
    return {"source": shown, **answer}


def fingerprint(source: str, previous: dict | None = None, timeout: float = PROBE_TIMEOUT,
                setting: tuple[str, str] = DATA_SETTING) -> dict[str, str]:
    """What data/source.json should hold for ``source`` now.

    Raises:
        StageError: a local source that does not exist, or a URL scheme other than http(s).
    """
    if is_url(source):
        return url_fingerprint(source, previous, timeout)
    if "://" in source:
        raise StageError(f"{redact(source)}: unsupported URL scheme; use http(s)://, a local archive or a folder")
    return folder_fingerprint(source, setting)


def record_source(source: str | None, out: Path = SOURCE_FILE, timeout: float = PROBE_TIMEOUT,
                  setting: tuple[str, str] = DATA_SETTING) -> bool:
    """Write ``out`` if the fingerprint of ``source`` changed; returns whether it did.

    An unchanged fingerprint leaves the file untouched, modification time included. No source
    (no boxes) is a fingerprint too: ``{"source": null}``.
    """
    previous = _previous(out)
    record = fingerprint(source, previous, timeout, setting) if source else {"source": None}
    if record == previous:
        return False
    write_json(out, record)
    return True


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=SOURCE_FILE)
    parser.add_argument("--boxes-out", type=Path, default=BOXES_SOURCE_FILE)
    parser.add_argument("--labels-out", type=Path, default=LABELS_SOURCE_FILE)
    parser.add_argument("--timeout", type=float, default=PROBE_TIMEOUT,
                        help=f"seconds to wait for a URL's server (default {PROBE_TIMEOUT:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    data = load_config(args.params, args.overrides).data
    changed = record_source(data.source, args.out, args.timeout)
    log.info("data source %s: %s", redact(data.source),
             "changed, the download stage will run" if changed else "unchanged")
    boxes_changed = record_source(data.boxes, args.boxes_out, args.timeout,
                                  BOXES_SETTING)
    log.info("box source %s: %s", redact(data.boxes or "none"),
             "changed, the boxes stage will run" if boxes_changed else "unchanged")
    labels = data.labels if data.labels and Path(data.labels).exists() else None
    if data.labels and labels is None and Path(f"{data.labels}.dvc").is_file():
        raise StageError(f"{data.labels}.dvc: the labelled images it versions are missing; run "
                         f"`dvc pull {data.labels}.dvc` (or `dvc checkout {data.labels}.dvc`)")
    labels_changed = record_source(labels, args.labels_out, args.timeout, LABELS_SETTING)
    log.info("labelled images %s: %s", labels or "none",
             "changed, the download stage will run" if labels_changed else "unchanged")


if __name__ == "__main__":
    sys.exit(run_stage(main))
