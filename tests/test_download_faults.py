"""Faults of the download stage: HTML pages, stalls, DNS, credentials, unsafe archives, zip
bombs, clashing file names. Each against a real server on 127.0.0.1 or a real file; each
leaves data/raw exactly as it was."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from neu_model.core.config import DATA_SOURCE_ENV
from neu_model.core.stage import StageError
from neu_model.data import archive
from neu_model.data import download as dl

from download_support import FAST, FIXTURE, KAGGLE, assert_unchanged, cfg, serve

# isort: split
# The fixtures isolated (autouse), tiny and published: pytest finds them among this module's names.
from neu_model.core.paths import PARAMS_FILE, ROOT

from download_support import isolated_work_dir, published_raw, tiny_source  # noqa: F401

SECRET = "s3cret-token"
HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Sign in to continue</body></html>\n"


def flat_zip(dest: Path, extra=()) -> Path:
    """The fixture as NEU-CLS/<file> in a zip, plus ``extra`` (name, bytes) members."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(FIXTURE.iterdir()):
            zf.write(f, f"NEU-CLS/{f.name}")
        for name, data in extra:
            zf.writestr(name, data)
    return dest


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def cached_files() -> list[Path]:
    return sorted(Path("data/cache").glob("*")) if Path("data/cache").exists() else []


# ---------------------------------------------------------------- what the server sends

@pytest.mark.parametrize("content_type, body", [("text/html; charset=utf-8", HTML),
                                                ("application/octet-stream", HTML),
                                                ("text/html", b"\n\nSign in: " + HTML)])
def test_html_page_instead_of_archive_fails_at_once(published, content_type, body):
    with serve({"/neu.zip": body}, content_type=content_type) as (base, hits):
        with pytest.raises(StageError) as err:
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
    text = one_line(err)
    assert f"{base}/neu.zip: got an HTML page, not an archive" in text
    assert hits["/neu.zip"] == 1  # the same page comes back on every retry: none is made
    assert cached_files() == []
    assert_unchanged(published)


def test_archive_sent_as_text_html_is_still_taken(tmp_path):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    with serve({"/neu.zip": body}, content_type="text/html") as (base, _):
        assert dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST).n_images == 30


@pytest.mark.parametrize("stall", ["headers", "body"])
@pytest.mark.slow
def test_stalled_server_hits_the_read_timeout(published, tmp_path, stall):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    with serve({"/neu.zip": body}, stall=stall) as (base, hits):
        with pytest.raises(StageError) as err:
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST, read_timeout=0.2)
    assert f"{base}/neu.zip: download failed after 4 attempts (no answer for 0.2s (read timeout))" in one_line(err)
    assert hits["/neu.zip"] == 4  # a stall may pass: retried
    assert cached_files() == []
    assert_unchanged(published)


def test_unknown_host_is_not_retried(published, caplog):
    host = "neu-data.invalid"  # RFC 2606: never a real name
    try:
        socket.getaddrinfo(host, 80)
        pytest.skip("this resolver answers for .invalid")
    except socket.gaierror as exc:
        if exc.errno not in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None)):
            pytest.skip(f"no DNS answer here ({exc}): a temporary failure, which is retried")
    with caplog.at_level(logging.WARNING), pytest.raises(StageError) as err:
        dl.download(cfg(f"http://{host}/neu.zip"), retry_delays=FAST)
    assert f"http://{host}/neu.zip: host not found" in one_line(err)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert_unchanged(published)


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no CA signed, and its key."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_untrusted_certificate_is_not_retried_and_says_how_to_trust_it(published, tmp_path, self_signed,
                                                                      monkeypatch, caplog):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    with serve({"/neu.zip": body}, tls=self_signed) as (base, _):
        with caplog.at_level(logging.WARNING), pytest.raises(StageError) as err:
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
        assert f"{base}/neu.zip: TLS certificate not trusted" in one_line(err) and "SSL_CERT_FILE" in str(err.value)
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
        assert_unchanged(published)
        monkeypatch.setenv("SSL_CERT_FILE", str(self_signed[0]))  # the fix the message gives
        assert dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST).n_images == 30


def test_wrong_password_is_not_retried_and_not_shown(published, tmp_path):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    with serve({"/neu.zip": body}, password=SECRET) as (base, hits):
        url = base.replace("http://", "http://ci:wrong-password@") + "/neu.zip"
        with pytest.raises(StageError) as err:
            dl.download(cfg(url), retry_delays=FAST)
    text = one_line(err)
    assert "http://***@127.0.0.1" in text and "HTTP 401" in text and "wrong-password" not in text
    assert hits["/neu.zip"] == 1
    assert_unchanged(published)


def test_credentials_are_not_sent_on_after_a_redirect(tmp_path):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    with serve({"/neu.zip": body}, host="127.0.0.2") as (other, other_hits):
        with serve({}, redirect={"/neu.zip": f"{other}/neu.zip"}, password=SECRET) as (base, hits):
            url = base.replace("http://", f"http://ci:{SECRET}@") + "/neu.zip"
            assert dl.download(cfg(url), retry_delays=FAST).n_images == 30
    assert hits.auth[0] and other_hits.auth == [None]  # the other host never saw the credentials


def run_stage_cli(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    env = {**os.environ, DATA_SOURCE_ENV: source, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "neu_model.data.download", "--params", str(PARAMS_FILE),
                           "--set", "data.expected_per_class=any"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_credentials_in_the_url_are_used_and_never_shown(tmp_path):
    body = flat_zip(tmp_path / "neu.zip").read_bytes()
    # 500 first: the stage logs a retry warning naming the URL, then downloads.
    with serve({"/neu.zip": body}, fail_first={"/neu.zip": 1}, password=SECRET) as (base, hits):
        url = base.replace("http://", f"http://ci:{SECRET}@")
        good = run_stage_cli(tmp_path, f"{url}/neu.zip")
        bad = run_stage_cli(tmp_path, f"{url}/missing.zip")
    assert good.returncode == 0, good.stderr
    assert hits["/neu.zip"] == 2 and all(hits.auth)  # the credentials reached the server, every time
    assert "retrying" in good.stderr and "http://***@127.0.0.1" in good.stderr
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: http://***@127.0.0.1")
    for proc in (good, bad):
        assert SECRET not in proc.stdout + proc.stderr
    written = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert len(written) == 33  # 30 images, the manifest, labels.json, the cached archive
    assert not [p for p in written if SECRET.encode() in p.read_bytes() or SECRET in str(p)]


# ---------------------------------------------------------------- what the archive holds

def zip_member(dest: Path, name: str, mode: int, data: bytes) -> Path:
    flat_zip(dest)
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.create_system = 3  # unix: the mode is meaningful
    with zipfile.ZipFile(dest, "a") as zf:
        zf.writestr(info, data)
    return dest


def tar_member(dest: Path, name: str, kind: bytes, linkname: str = "") -> Path:
    with tarfile.open(dest, "w") as tf:
        tf.add(FIXTURE, arcname="NEU-CLS")
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        tf.addfile(info)
    return dest


UNSAFE = {
    "zip-symlink-image": (lambda d: zip_member(d / "a.zip", "NEU-CLS/Cr_9.bmp", stat.S_IFLNK | 0o777, b"Cr_1.bmp"),
                          "'NEU-CLS/Cr_9.bmp' is a link"),
    "zip-symlink-outside": (lambda d: zip_member(d / "a.zip", "NEU-CLS/notes", stat.S_IFLNK | 0o777, b"../../etc"),
                            "'NEU-CLS/notes' is a link pointing outside the archive"),
    "zip-fifo": (lambda d: zip_member(d / "a.zip", "NEU-CLS/pipe", stat.S_IFIFO | 0o644, b""),
                 "'NEU-CLS/pipe' is a device file or FIFO"),
    "zip-absolute": (lambda d: zip_member(d / "a.zip", "/abs/Cr_9.bmp", stat.S_IFREG | 0o644, b"x"),
                     "'/abs/Cr_9.bmp' would be written outside"),
    "tar-symlink-image": (lambda d: tar_member(d / "a.tar", "NEU-CLS/Cr_9.bmp", tarfile.SYMTYPE, "Cr_1.bmp"),
                          "'NEU-CLS/Cr_9.bmp' is a link"),
    "tar-hardlink-outside": (lambda d: tar_member(d / "a.tar", "NEU-CLS/x", tarfile.LNKTYPE, "../outside"),
                             "'NEU-CLS/x' is a link pointing outside the archive"),
    "tar-symlink-absolute": (lambda d: tar_member(d / "a.tar", "NEU-CLS/etc", tarfile.SYMTYPE, "/etc"),
                             "'NEU-CLS/etc' is a link pointing outside the archive"),
    "tar-device": (lambda d: tar_member(d / "a.tar", "NEU-CLS/null", tarfile.CHRTYPE),
                   "member 'NEU-CLS/null' refused"),
    "tar-fifo": (lambda d: tar_member(d / "a.tar", "NEU-CLS/pipe", tarfile.FIFOTYPE),
                 "member 'NEU-CLS/pipe' refused"),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_member_is_refused_by_name(case, tmp_path, published):
    make, message = UNSAFE[case]
    bad = make(tmp_path)
    with pytest.raises(StageError) as err:
        dl.download(cfg(bad))
    assert message in one_line(err) and str(bad) in str(err.value)
    assert_unchanged(published)


def test_link_inside_the_archive_not_named_as_an_image_is_skipped(tmp_path):
    bad = tar_member(tmp_path / "a.tar", "NEU-CLS/README", tarfile.SYMTYPE, "Cr_1.bmp")
    assert dl.download(cfg(bad)).n_images == 30


def bomb_zip(dest: Path, unpacked: int) -> Path:
    return flat_zip(dest, [("NEU-CLS/Cr_99.bmp", b"\0" * unpacked)])


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_unpacking_past_the_limit_is_refused_before_writing(kind, tmp_path, published):
    bomb = tmp_path / f"bomb.{kind}"
    if kind == "zip":
        bomb_zip(bomb, 3 << 20)
    else:
        with tarfile.open(bomb, "w:gz") as tf:
            tf.add(FIXTURE, arcname="NEU-CLS")
            info = tarfile.TarInfo("NEU-CLS/Cr_99.bmp")
            info.size = 3 << 20
            tf.addfile(info, io.BytesIO(b"\0" * info.size))
    assert bomb.stat().st_size < 1 << 20  # small on disk, large unpacked
    with pytest.raises(StageError) as err:
        archive.extract(bomb, tmp_path / "out", max_bytes=2 << 20)
    assert "its images unpack to 4 MB, more than the limit of 2 MB (data.max_unpacked_mb)" in one_line(err)
    assert not (tmp_path / "out").exists()  # refused from the headers: nothing written
    with pytest.raises(StageError, match="more than the limit of 2 MB"):
        dl.download(cfg(bomb), max_unpacked_mb=2)
    assert_unchanged(published)
    assert archive.extract(bomb, tmp_path / "big", max_bytes=8 << 20) is None  # a higher limit takes it


def test_member_larger_than_its_header_says_is_refused(tmp_path, published):
    # The headers of the bomb's member claim 1,000 bytes; its data inflate to 3 MB.
    data = bytearray(bomb_zip(tmp_path / "liar.zip", 3 << 20).read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.rfind(signature)  # the bomb is the last member
        struct.pack_into("<I", data, pos + offset, 1000)
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"liar.zip: damaged archive"):
        archive.extract(tmp_path / "liar.zip", tmp_path / "out", max_bytes=2 << 20)
    written = [p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and max(written) < 1 << 20  # never more than a header allowed
    with pytest.raises(StageError, match=r"damaged archive"):
        dl.download(cfg(tmp_path / "liar.zip"), max_unpacked_mb=2)
    assert_unchanged(published)


def test_writing_stops_at_the_header_size_and_at_the_budget(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\1" * (3 << 20))
    member = archive.Member("NEU-CLS/Cr_99.bmp", ("NEU-CLS", "Cr_99.bmp"), "file", 1000, False, src.open)
    with src.open("rb") as fh, pytest.raises(StageError, match=r"'NEU-CLS/Cr_99.bmp' unpacks to more than its header"):
        archive.copy_limited(fh, tmp_path / "a.bmp", member, [10 << 20], tmp_path / "x.zip")
    honest = archive.Member("NEU-CLS/Cr_99.bmp", ("NEU-CLS", "Cr_99.bmp"), "file", 3 << 20, False, src.open)
    with src.open("rb") as fh, pytest.raises(StageError, match=r"the unpacked-size limit"):
        archive.copy_limited(fh, tmp_path / "b.bmp", honest, [2 << 20], tmp_path / "x.zip")
    assert (tmp_path / "a.bmp").stat().st_size == 0 and (tmp_path / "b.bmp").stat().st_size <= 2 << 20


def test_download_over_the_limit_is_refused_before_reading(tmp_path, published):
    body = bomb_zip(tmp_path / "neu.zip", 3 << 20).read_bytes() + b"\0" * (3 << 20)  # 3 MB on the wire
    with serve({"/neu.zip": body}) as (base, hits):
        with pytest.raises(StageError) as err:
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST, max_unpacked_mb=2)
    size = f"{len(body) / 2**20:.1f} MB"
    assert f"{base}/neu.zip: the download is {size} (Content-Length), more than the limit of 2 MB" in one_line(err)
    assert hits["/neu.zip"] == 1 and cached_files() == []
    assert_unchanged(published)


@pytest.mark.parametrize("damage, message", [("one-byte", "damaged archive"),
                                             ("noise", "not a folder, zip or tar archive")])
@pytest.mark.slow
def test_damaged_download_leaves_the_cache(damage, message, tmp_path, published):
    good = flat_zip(tmp_path / "neu.zip").read_bytes()
    bad = bytearray(good) if damage == "one-byte" else bytearray(i * 7919 % 251 for i in range(len(good)))
    bad[len(bad) // 2] ^= 0xFF  # inside an image's data: its CRC fails
    files = {"/neu.zip": bytes(bad)}
    with serve(files) as (base, hits):
        with pytest.raises(StageError) as err:
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
        assert f"{base}/neu.zip: the download is unusable ({message}" in one_line(err)
        assert "the next run downloads it again" in str(err.value)
        assert cached_files() == []
        assert_unchanged(published)
        files["/neu.zip"] = good  # the server is fixed: the next run downloads again
        assert dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST).n_images == 30
    assert hits["/neu.zip"] == 2


def test_html_saved_as_an_archive_is_named(tmp_path, published):
    (tmp_path / "neu.zip").write_bytes(HTML)
    with pytest.raises(StageError, match=r"neu.zip: an HTML page, not an archive"):
        dl.download(cfg(tmp_path / "neu.zip"))
    assert_unchanged(published)


# ---------------------------------------------------------------- the same file name twice

def kaggle_with(tmp_path: Path, *extra: tuple[str, bytes]) -> Path:
    """The fixture in Kaggle's class folders, plus ``extra`` (path under the top folder, bytes)."""
    dest = tmp_path / "k.zip"
    top = "NEU Metal Surface Defects Data"
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(FIXTURE.iterdir()):
            zf.write(f, f"{top}/{KAGGLE[f.name.split('_')[0]]}/{f.name}")
        for name, data in extra:
            zf.writestr(f"{top}/{name}", data)
    return dest


CR, IN = (FIXTURE / "Cr_1.bmp").read_bytes(), (FIXTURE / "In_1.bmp").read_bytes()
CLASHES = {
    "name-in-two-classes": ([("train/Crazing/x.bmp", CR), ("valid/Inclusion/x.bmp", IN)],
                            ("train/Crazing/x.bmp and .*valid/Inclusion/x.bmp: the same file name in class Cr and "
                             "class In")),
    "image-in-two-classes": ([("train/Crazing/x.bmp", CR), ("valid/Inclusion/x.bmp", CR)],
                             "train/Crazing/x.bmp and .*valid/Inclusion/x.bmp: the same image labelled Cr and In"),
    # the fixture has train/Crazing/Cr_1.bmp
    "name-twice-in-a-class-differing": ([("test/Crazing/Cr_1.bmp", IN)],
                                        ("test/Crazing/Cr_1.bmp and .*train/Crazing/Cr_1.bmp both become Cr_1.bmp "
                                         "but differ")),
}


@pytest.mark.parametrize("case", CLASHES)
def test_same_file_name_twice_is_refused_naming_both(case, tmp_path, published):
    extra, message = CLASHES[case]
    with pytest.raises(StageError, match=message) as err:
        dl.download(cfg(kaggle_with(tmp_path, *extra)))
    one_line(err)
    assert_unchanged(published)


def test_identical_copy_in_the_same_class_is_kept_once_with_a_note(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = dl.download(cfg(kaggle_with(tmp_path, ("test/Crazing/Cr_1.bmp", CR))))
    assert result.counts["Cr"] == 5 and result.n_images == 30
    notes = [r.getMessage() for r in caplog.records if "identical copies" in r.getMessage()]
    assert len(notes) == 1 and "train/Crazing/Cr_1.bmp (a copy of " in notes[0]
    assert Path("data/raw/NEU-CLS/Cr_1.bmp").read_bytes() == CR
