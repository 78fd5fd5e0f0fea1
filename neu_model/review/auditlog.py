"""The review's audit log (``<state>/audit.jsonl``) and what it decides: one JSON object a line.

Every decision of the review page is appended before the page hears back: one ``os.write`` of
the whole line on an ``O_APPEND`` descriptor, then ``os.fsync``. A kill can therefore cut off
at most the line being written; on start (``AuditLog``) such a trailing partial line is
truncated away with a warning, and every complete line is kept. Nothing is ever rewritten: an
undo is a new line naming the one it takes back.

Fields (``RECORD_FIELDS``): ``id`` (increasing), ``kind`` (``label``, ``undo``, ``skip``),
``tile`` (``<sha256>:<x>:<y>``), ``file`` (the CSV's value), ``x``, ``y``, ``sha256`` (of the
image's bytes), ``label`` (a class code or ``unknown``; for an undo the label taken back; null for
a skip), ``reviewer``, ``time`` (UTC ISO), ``seconds`` (spent on the tile, from the page),
``model_version``, ``predicted``, ``confidence``, ``queue`` (``review`` or ``audit``), ``undoes``
(the id an undo takes back), and ``path`` (the file as the server found it on disk, which
``neu-review commit`` reads the pixels from).

``Decisions`` replays the log: a reviewer's label of a tile is their last one not undone; a
tile's final label is the one that more than half of its reviewers hold. Two reviewers who
disagree are a conflict until a third one sides with one of them (or one of them undoes theirs):
no label is ever overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from neu_model.core.config import CLASSES
from neu_model.core.stage import StageError

AUDIT_FILE = "audit.jsonl"
UNKNOWN = "unknown"
LABELS = (*CLASSES, UNKNOWN)
KINDS = ("label", "undo", "skip")
RECORD_FIELDS = ("id", "kind", "tile", "file", "x", "y", "sha256", "label", "reviewer", "time", "seconds",
                 "model_version", "predicted", "confidence", "queue", "undoes", "path")

log = logging.getLogger("neu_model.review.auditlog")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The complete records of a log; a trailing partial line is ignored, or with ``repair``
    truncated away (with a warning).

    Raises:
        StageError: a complete line that is not a record (the file was edited or damaged).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(complete)
                os.fsync(fh.fileno())
        log.warning("%s: %s a partial last line (%d bytes, a write cut off by a kill); every complete decision "
                    "is kept", path, "removed" if repair else "ignored", len(data) - complete)
    records = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            record, why = None, str(exc)
        else:
            why = "not a decision record"
        if not isinstance(record, dict) or record.get("kind") not in KINDS or not isinstance(record.get("id"), int):
            raise StageError(f"{path}:{number}: {why}; the log was edited or damaged: restore it from a copy "
                             "(neu-review only appends to it)")
        records.append(record)
    return records


class AuditLog:
    """The log of one state folder, open for appending (``module docstring``).

    Args:
        folder: the state folder (created if missing).

    Attributes:
        path: ``<folder>/audit.jsonl``.
        records: every record, oldest first (those on disk at start, then those appended).
    """

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / AUDIT_FILE
        created = not self.path.exists()
        self.records = read_records(self.path, repair=True)
        self.next_id = max((r["id"] for r in self.records), default=0) + 1
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # the new name must survive a power cut too
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._lock = threading.Lock()

    def append(self, fields: dict) -> dict:
        """Write one record (``id`` and ``time`` added) to disk, synced, and return it.

        Raises:
            StageError: the write failed (disk full...); the file is cut back to its last
                complete line, so that a later record does not follow half a line.
        """
        with self._lock:
            record = {**fields, "id": self.next_id, "time": fields.get("time") or utc_now()}
            record = {k: record.get(k) for k in RECORD_FIELDS}
            data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
            size = os.fstat(self._fd).st_size
            try:
                written = os.write(self._fd, data)  # one write: a kill leaves at most this line partial
                if written != len(data):
                    raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                os.ftruncate(self._fd, size)
                raise StageError(f"{self.path}: decision not recorded ({exc.strerror or exc}); free disk space "
                                 "and press the key again") from None
            self.next_id += 1
            self.records.append(record)
            return record

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class Final:
    """A tile's outcome.

    Attributes:
        label: the label more than half of its reviewers hold; None when none does (a conflict)
            or nobody labelled it.
        votes: each reviewer's current label.
        record: the latest label record of the winning label (reviewer, time, id for the manifest).
    """

    label: str | None
    votes: dict[str, str]
    record: dict | None

    @property
    def conflict(self) -> bool:
        return self.label is None and bool(self.votes)


@dataclass
class Decisions:
    """The state the log's records build, applied one at a time (``apply``)."""

    records: dict[int, dict] = field(default_factory=dict)
    # tile -> reviewer -> ids of that reviewer's labels of it not undone, oldest first
    labels: dict[str, dict[str, list[int]]] = field(default_factory=lambda: defaultdict(dict))
    history: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # reviewer -> decisions
    skipped: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # reviewer -> tiles

    @classmethod
    def replay(cls, records: list[dict]) -> Decisions:
        decisions = cls()
        for record in records:
            decisions.apply(record)
        return decisions

    def apply(self, record: dict) -> None:
        self.records[record["id"]] = record
        reviewer, tile = record["reviewer"], record["tile"]
        if record["kind"] == "label":
            self.labels[tile].setdefault(reviewer, []).append(record["id"])
            self.history[reviewer].append(record["id"])
        elif record["kind"] == "skip":
            self.skipped[reviewer].add(tile)
            self.history[reviewer].append(record["id"])
        else:
            undone = self.records.get(record.get("undoes"))
            if undone is None or record["undoes"] not in self.history[reviewer]:
                return  # undoes nothing current: recorded, without effect
            self.history[reviewer].remove(undone["id"])
            if undone["kind"] == "skip":
                self.skipped[reviewer].discard(undone["tile"])
            else:
                ids = self.labels[undone["tile"]][reviewer]
                ids.remove(undone["id"])
                if not ids:
                    del self.labels[undone["tile"]][reviewer]

    def last_decision(self, reviewer: str) -> dict | None:
        """The reviewer's latest label or skip not undone (what ``z`` takes back)."""
        ids = self.history.get(reviewer)
        return self.records[ids[-1]] if ids else None

    def votes(self, tile: str) -> dict[str, str]:
        return {reviewer: self.records[ids[-1]]["label"] for reviewer, ids in self.labels.get(tile, {}).items()}

    def final(self, tile: str) -> Final:
        votes = self.votes(tile)
        if not votes:
            return Final(None, {}, None)
        (label, count), *_ = Counter(votes.values()).most_common(1)
        if count * 2 <= len(votes):
            return Final(None, votes, None)
        latest = max(self.labels[tile][r][-1] for r, v in votes.items() if v == label)
        return Final(label, votes, self.records[latest])

    def labelled(self) -> dict[str, Final]:
        """Every tile with at least one current label, and its outcome."""
        return {tile: self.final(tile) for tile, by in self.labels.items() if by}
