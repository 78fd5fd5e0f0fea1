"""neu-review commit: the audit log's final labels as PNGs, a manifest, a DVC-tracked folder, a git
commit of labels.dvc alone, and the Prefect event (against a real server: slow)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neu_model.data.labels import LABELS_MANIFEST_COLUMNS, labels_version
from neu_model.review.auditlog import AuditLog
from neu_model.review.commit import commit
from neu_model.review.publish import NO_API
from neu_model.review.queue import load_queue
from neu_model.review.session import ReviewSession
from neu_model.review.tiles import read_tile

from review_support import copy_images, row, strip, write_predictions
from server_support import running_server

BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def reviewed(root: Path, decisions: list[tuple[str, int, str]]) -> tuple[Path, ReviewSession]:
    """A strip (6 tiles) and two single images, all flagged, and ``decisions`` (reviewer, tile id,
    label) recorded through the review session as the page records them; returns the state folder."""
    image = strip(root / "strip.png")
    singles = copy_images(root / "img", ["Sc_2", "Cr_3"])
    rows = [row(str(image), "Cr", 0.2 + 0.05 * i, x=200 * (i % 3), y=200 * (i // 3)) for i in range(6)]
    rows += [row(str(p), p.name[:2], 0.5) for p in singles]
    pred = write_predictions(root / "pred.csv", rows, model="models:/neu-defect-classifier/7")
    state = root / "state"
    session = ReviewSession(load_queue([pred], 0.0), AuditLog(state))
    for reviewer, tile_id, code in decisions:
        session.decide(reviewer, tile_id, "label", code, seconds=1.0)
    session.log.close()
    return state, session


def manifest(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == LABELS_MANIFEST_COLUMNS
        return list(reader)


def test_commit_writes_the_tiles_as_pngs_with_a_manifest_and_is_idempotent(tmp_path, capsys):
    state, session = reviewed(tmp_path, [("alice", 0, "Cr"), ("alice", 1, "In"), ("bob", 2, "unknown"),
                                         ("alice", 3, "Pa"), ("bob", 3, "PS"),  # a conflict: left out
                                         ("bob", 6, "Sc")])
    labels = tmp_path / "labels"
    planned = commit(state, labels, tmp_path, message_only=True)
    assert not labels.exists()  # --message-only writes nothing
    line = commit(state, labels, tmp_path, git=False, event=False)
    version = labels_version(labels)
    assert planned == f"labels: 4 images (alice 2, bob 2); data version {version}"
    assert line == (f"committed 4 labels (Cr 1, In 1, Sc 1, unknown 1) by alice 2, bob 2; data version {version}; "
                    "git skipped (--no-git); event not sent (--no-event)")
    assert "conflict:" in capsys.readouterr().err
    rows = manifest(labels)
    assert [r["label"] for r in rows] == ["Cr", "In", "unknown", "Sc"]
    assert sorted(p.name for p in labels.iterdir()) == sorted(["manifest.csv", *(r["file"] for r in rows)])
    by_id = {t.id: t for t in session.tiles}
    for r, tile_id in zip(rows, (0, 1, 2, 6), strict=True):
        tile = by_id[tile_id]
        png = (labels / r["file"]).read_bytes()
        assert r["file"] == f"{r['label']}_{r['sha256'][:16]}.png"
        assert hashlib.sha256(png).hexdigest() == r["sha256"]
        image = Image.open(io.BytesIO(png))
        assert image.mode == "L" and image.size == (200, 200)
        assert np.array_equal(np.asarray(image), read_tile(tile.origin.ref, tile.x, tile.y))
        assert (r["origin"], int(r["x"]), int(r["y"])) == (tile.origin.ref, tile.x, tile.y)
        assert r["model_version"] == "models:/neu-defect-classifier/7" and r["predicted"] == tile.predicted
        assert r["reviewer"] in ("alice", "bob") and int(r["audit_id"]) >= 1 and r["time"].endswith("+00:00")
    before = {p.name: p.read_bytes() for p in labels.iterdir()}
    again = commit(state, labels, tmp_path, git=False, event=False)
    assert again.startswith("committed 0 labels: nothing new (4 already committed, 1 conflicts)")
    assert {p.name: p.read_bytes() for p in labels.iterdir()} == before
    assert not list(tmp_path.glob(".labels.*"))  # no build folder left behind


def test_a_label_changed_after_its_commit_is_a_conflict_and_left_as_committed(tmp_path, capsys):
    state, _ = reviewed(tmp_path, [("alice", 0, "Cr"), ("alice", 1, "In")])
    labels = tmp_path / "labels"
    commit(state, labels, tmp_path, git=False, event=False)
    log = AuditLog(state)
    session = ReviewSession(load_queue([tmp_path / "pred.csv"], 0.0), log)
    session.decide("alice", 0, "label", "RS")  # alice changes her mind after the commit
    session.decide("alice", 4, "label", "Sc")
    log.close()
    line = commit(state, labels, tmp_path, git=False, event=False)
    assert line.startswith("committed 1 labels (Sc 1) by alice 1")
    assert "labelled RS now, committed as Cr" in capsys.readouterr().err
    assert [r["label"] for r in manifest(labels)] == ["Cr", "In", "Sc"]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=os.environ | GIT_ENV).stdout


def workspace(root: Path) -> Path:
    """A git repository with DVC, one commit, and a staged change that is none of the commit's business."""
    root.mkdir()
    git("init", "-q", cwd=root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "README").write_text("plant\n")
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "start", cwd=root)
    (root / "other.txt").write_text("someone else's work\n")
    git("add", "other.txt", cwd=root)
    return root


def test_commit_versions_the_folder_with_dvc_and_commits_labels_dvc_alone(tmp_path, monkeypatch, capsys):
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    state, _ = reviewed(tmp_path, [("alice", 0, "Cr"), ("bob", 1, "In"), ("alice", 6, "Sc")])
    root = workspace(tmp_path / "ws")
    line = commit(state, root / "labels", root, event=False)
    sha = git("rev-parse", "--short", "HEAD", cwd=root).strip()
    version = labels_version(root / "labels")
    assert line.endswith(f"data version {version}; git {sha}; event not sent (--no-event)")
    assert git("show", "--name-only", "--format=%s", "HEAD", cwd=root).split() == \
        ["labels:", "3", "images", "(alice", "2,", "bob", "1);", "data", "version", f"{version}", "labels.dvc"]
    assert "outs:" in (root / "labels.dvc").read_text()
    assert git("diff", "--cached", "--name-only", cwd=root).split() == ["other.txt"]  # still staged, not committed
    assert "no DVC remote" in capsys.readouterr().err
    # A remote configured: the next commit pushes its images there.
    remote = tmp_path / "remote"
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], cwd=root, check=True)
    log = AuditLog(state)
    ReviewSession(load_queue([tmp_path / "pred.csv"], 0.0), log).decide("bob", 3, "label", "PS")
    log.close()
    assert commit(state, root / "labels", root, event=False).startswith("committed 1 labels (PS 1) by bob 1")
    assert "pushed labels to the DVC remote" in capsys.readouterr().err
    assert len([p for p in remote.rglob("*") if p.is_file()]) >= 5  # 4 PNGs, the manifest, the folder's listing
    assert commit(state, root / "labels", root, event=False).startswith("committed 0 labels: nothing new")
    assert len(git("log", "--format=%h", cwd=root).split()) == 3  # start and two label commits


def neu_review(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return subprocess.run([str(BIN / "neu-review"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=clean | {"PREFECT_HOME": str(cwd / ".prefect")} | env)


def test_without_prefect_api_url_the_commit_says_no_event_was_sent(tmp_path):
    state, _ = reviewed(tmp_path, [("alice", 0, "Cr")])
    done = neu_review(["commit", "--no-git", "--state", str(state)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert NO_API in done.stderr and done.stdout.strip().endswith("event not sent (no PREFECT_API_URL)")
    assert not (tmp_path / ".prefect" / "prefect.db").exists()  # no temporary server was started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_event_reaches_a_real_prefect_server_before_the_command_exits(tmp_path):
    import httpx

    state, _ = reviewed(tmp_path, [("alice", 0, "Cr"), ("bob", 1, "unknown")])
    home, port = tmp_path / "prefect-home", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                        "PREFECT_API_URL": url}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running_server(cmd, f"{url}/health", home / "server.log", 300, cwd=home, env=env):
        done = neu_review(["commit", "--no-git", "--state", str(state)], tmp_path, PREFECT_API_URL=url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("event sent")
        version = labels_version(tmp_path / "labels")
        body = {"filter": {"event": {"name": ["neu.labels.committed"]}}, "limit": 10}
        for _ in range(60):  # the server stores events in batches
            events = httpx.post(f"{url}/events/filter", json=body, timeout=10).json()["events"]
            if events:
                break
            time.sleep(1)
        [event] = events
    assert event["resource"]["prefect.resource.id"] == f"neu.labels.{tmp_path.name}"
    assert event["payload"] == {"count": 2, "total": 2, "trainable": 1, "data_version": version,
                                "reviewers": {"alice": 1, "bob": 1}}
