"""Bring a data source onto local disk: a URL is downloaded once into a cache, with retries for
what can pass and one-line errors for what cannot; a cached download that turns out damaged is
dropped so the next run fetches it again.

The download stage's only retry layer (an orchestrator must not add its own on top, or one
unreachable server costs attempts times attempts). Retried: connection errors, resets,
timeouts, 5xx, 408 and 429. Not retried, since a second attempt gets the same answer: a host
name that does not exist, an untrusted TLS certificate, any other 4xx, an HTML page where an
archive was expected, a file over the size limit. Credentials in the URL are sent as a Basic Authorization header
(never to another host after a redirect) and never shown: messages and logs use
``redact_url``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from neu_model.core.files import atomic_path
from neu_model.core.redact import redact_url, split_credentials
from neu_model.core.stage import StageError
from neu_model.data.archive import DamagedArchive, extract

log = logging.getLogger("neu_model.data.download")

RETRY_DELAYS = (1.0, 2.0, 4.0)  # seconds to wait before each retry
READ_TIMEOUT = 30.0  # seconds without a byte from the server before an attempt is given up
MAX_BYTES = 2 << 30  # the most a download may write (the unpacked-size limit applies to it too)
CHUNK = 1 << 20
HTML_TYPES = ("text/html", "application/xhtml+xml")
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")
ARCHIVE_STARTS = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # zip, gzip, bzip2, xz
# getaddrinfo's "this name does not exist" answers; EAI_AGAIN (no DNS server reachable) is retried.
NAME_NOT_FOUND = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}
BY_HAND = "or download the archive by hand and point data.source at the file"


def fetch_url(url: str, dest: Path, retry_delays: Sequence[float] = RETRY_DELAYS,
              read_timeout: float = READ_TIMEOUT, max_bytes: int = MAX_BYTES) -> None:
    """Download ``url`` to ``dest`` atomically (nothing is left at ``dest`` on failure).

    Args:
        url: http(s) URL; ``user:password@`` in it becomes a Basic Authorization header.
        dest: the file to write.
        retry_delays: seconds to wait before each retry; ``len + 1`` attempts in all.
        read_timeout: seconds the server may stay silent (connecting or mid-file).
        max_bytes: refuse a download larger than this.

    Raises:
        StageError: a failure no retry can fix (at once), or every attempt failed.
    """
    shown = redact_url(url)
    plain, auth = split_credentials(url)
    for attempt in range(len(retry_delays) + 1):
        try:
            _stream(plain, auth, dest, read_timeout, max_bytes, shown)
            return
        except urllib.error.HTTPError as exc:
            # A 4xx will not change on retry; 408/429 are the server asking us to come back.
            if exc.code < 500 and exc.code not in (408, 429):
                raise StageError(f"{shown}: HTTP {exc.code} {exc.reason}; fix data.source (or NEU_DATA_SOURCE), "
                                 f"{BY_HAND}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            error = _describe(exc, read_timeout, shown)
        if attempt == len(retry_delays):
            raise StageError(f"{shown}: download failed after {attempt + 1} attempts ({error}); check the network, "
                             f"{BY_HAND}")
        log.warning("download of %s failed (%s); retrying in %gs", shown, error, retry_delays[attempt])
        time.sleep(retry_delays[attempt])


def _describe(exc: BaseException, read_timeout: float, shown: str) -> str:
    """A short text for a retryable error; raises StageError for an unknown host or an untrusted certificate."""
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, socket.gaierror) and reason.errno in NAME_NOT_FOUND:
        raise StageError(f"{shown}: host not found ({reason.strerror}); fix the host name in data.source "
                         f"(or NEU_DATA_SOURCE), {BY_HAND}") from None
    if isinstance(reason, ssl.SSLCertVerificationError):
        raise StageError(f"{shown}: TLS certificate not trusted ({reason.verify_message}); if the server uses a "
                         f"company CA, point SSL_CERT_FILE at its certificate bundle") from None
    if isinstance(reason, TimeoutError):
        return f"no answer for {read_timeout:g}s (read timeout)"
    return redact_url(str(reason)) or reason.__class__.__name__


def _request(url: str, auth: str | None) -> urllib.request.Request:
    request = urllib.request.Request(url, headers={"User-Agent": "neu-model-download"})
    if auth:
        # Unredirected: urllib would otherwise send it on to whatever host a redirect names.
        request.add_unredirected_header("Authorization", auth)
    return request


def _stream(url: str, auth: str | None, dest: Path, read_timeout: float, max_bytes: int, shown: str) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(_request(url, auth), timeout=read_timeout) as resp, atomic_path(dest) as tmp:
        kind = resp.headers.get_content_type()
        total = int(resp.headers.get("Content-Length") or 0) or None
        if total is not None and total > max_bytes:
            raise _too_big(shown, f"is {total / 2**20:.1f} MB (Content-Length), more than", max_bytes)
        quiet = not sys.stderr.isatty()  # in CI logs a progress bar is noise: log lines instead
        log.info("downloading %s (%s bytes)", shown, total or "unknown")
        start, done = time.monotonic(), 0
        with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True, disable=quiet) as bar:
            while block := resp.read(CHUNK):
                if done == 0:
                    _refuse_html(block, kind, shown)
                done += len(block)
                if done > max_bytes:
                    raise _too_big(shown, "passed", max_bytes)
                out.write(block)
                bar.update(len(block))
        if total is not None and done != total:
            # http.client does not flag a connection closed early; a short file must not be cached.
            raise http.client.IncompleteRead(b"", total - done)
        log.info("downloaded %d bytes in %.1fs", done, time.monotonic() - start)


def _refuse_html(first_block: bytes, content_type: str, shown: str) -> None:
    """Raise if the body is an HTML page (a login or error page) rather than an archive.

    The bytes decide: an archive served as text/html by a careless server is still taken.
    """
    looks_html = first_block.lstrip()[:20].lower().startswith(HTML_STARTS)
    looks_archive = first_block.startswith(ARCHIVE_STARTS) or first_block[257:262] == b"ustar"
    if looks_html or (content_type in HTML_TYPES and not looks_archive):
        raise StageError(f"{shown}: got an HTML page, not an archive (Content-Type {content_type}); the URL needs a "
                         f"login or points to a web page: use the archive's direct download URL in data.source, "
                         f"{BY_HAND}")


def _too_big(shown: str, how: str, max_bytes: int) -> StageError:
    return StageError(f"{shown}: the download {how} the limit of {max_bytes / 2**20:g} MB (data.max_unpacked_mb); "
                      f"check the URL, or raise the limit")


def local_source(source: str, cache_dir: Path, retry_delays: Sequence[float] = RETRY_DELAYS,
                 read_timeout: float = READ_TIMEOUT, max_bytes: int = MAX_BYTES) -> tuple[Path, bool]:
    """A local folder or archive for ``source``, and whether it is a cached download.

    Args:
        source: an http(s) URL of an archive, a local archive or a local folder.
        cache_dir: where a URL's archive is downloaded, once; later runs reuse that copy.
        retry_delays: seconds to wait before each retry of the download.
        read_timeout: seconds the server may stay silent.
        max_bytes: refuse a download larger than this.

    Raises:
        StageError: another URL scheme, a path that does not exist, or a failed download.
    """
    if re.match(r"^https?://", source, re.IGNORECASE):
        plain, _ = split_credentials(source)  # a new token for the same file reuses the cached copy
        low = plain.lower().split("?")[0]
        ext = next((e for e in (".tar.gz", ".tgz", ".tar", ".zip") if low.endswith(e)), ".archive")
        cached = cache_dir / (hashlib.sha256(plain.encode()).hexdigest() + ext)
        if cached.exists():
            log.info("using cached %s for %s", cached, redact_url(source))
        else:
            fetch_url(source, cached, retry_delays, read_timeout, max_bytes)
        return cached, True
    if "://" in source:
        raise StageError(f"{source}: unsupported URL scheme; use http(s)://, a local archive or a folder")
    path = Path(source).expanduser()
    if not path.exists():
        raise StageError(f"{source}: no such file or folder (relative to {Path.cwd()}); "
                         f"fix data.source in params.yaml or set NEU_DATA_SOURCE")
    return path, False


def extract_source(archive: Path, dest: Path, max_bytes: int, cached: bool, shown_source: str) -> None:
    """``archive.extract``, naming a cached download by its source; a damaged one leaves the cache.

    Raises:
        StageError: the archive is unsafe or damaged; a damaged cached download is deleted first.
    """
    try:
        extract(archive, dest, max_bytes)
    except DamagedArchive as exc:
        if not cached:
            raise
        archive.unlink(missing_ok=True)  # else every later run would fail on the same bad copy
        raise StageError(f"{shown_source}: the download is unusable ({exc.what}); removed it from {archive.parent}, "
                         f"the next run downloads it again") from None
    except StageError as exc:
        raise StageError(str(exc).replace(str(archive), shown_source) if cached else str(exc)) from None
