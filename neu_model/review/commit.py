"""``neu-review commit``: the audit log's final labels as a new version of ``labels/``.

Each tile's final label (``auditlog.Decisions``: every reviewer's last label not undone, the
one more than half of them hold) becomes a lossless 8-bit grayscale PNG of the pixels the model
saw (``tiles.read_tile``, checked against the sha256 recorded when it was labelled), named
``<label>_<first 16 hex of the PNG's sha256>.png``, with a row in ``manifest.csv``
(``LABELS_MANIFEST_COLUMNS``). Rows already there are kept as they are: a tile committed before
with the same label is not added again, and one committed with another label is reported as a
conflict and left as committed. Tiles whose reviewers disagree are left out and listed.

The new folder is built beside the old one and swapped in (``core.files.replace_dir``): a kill
leaves the last good folder. Then ``publish`` versions it (``dvc add``, a git commit of
``labels.dvc`` alone, ``dvc push`` to a configured remote) and announces it to Prefect.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from neu_model.core.config import CLASSES
from neu_model.core.files import process_alive, replace_dir
from neu_model.core.stage import StageError
from neu_model.data.labels import LABELS_MANIFEST, LABELS_MANIFEST_COLUMNS, UNKNOWN_LABEL
from neu_model.review.auditlog import AUDIT_FILE, Decisions, read_records
from neu_model.review.tiles import TileError, png_bytes, read_tile


@dataclass
class Plan:
    """What a commit adds to the folder, and what it leaves out (one line each)."""

    kept: list[dict]  # the manifest's rows before
    new: list[tuple[dict, bytes]] = field(default_factory=list)  # (row, PNG bytes)
    already: int = 0
    conflicts: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def manifest(self) -> bytes:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, LABELS_MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*self.kept, *(row for row, _ in self.new)])
        return buf.getvalue().encode()

    def version(self) -> str:
        """The data version the folder will have (``data.labels.labels_version`` of it)."""
        return hashlib.sha256(self.manifest()).hexdigest()[:12]

    def reviewers(self) -> dict[str, int]:
        return dict(Counter(row["reviewer"] for row, _ in self.new).most_common())

    def classes(self) -> dict[str, int]:
        counts = Counter(row["label"] for row, _ in self.new)
        return {c: counts[c] for c in (*CLASSES, UNKNOWN_LABEL) if counts[c]}


def read_manifest(folder: Path) -> list[dict]:
    """The rows of ``<folder>/manifest.csv``; none when there is no folder yet.

    Raises:
        StageError: a manifest in another format.
    """
    path = folder / LABELS_MANIFEST
    if not path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise StageError(f"{folder}: files but no {LABELS_MANIFEST}; restore it with `dvc checkout "
                             f"{folder.name}.dvc` or move the folder aside")
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    if tuple(reader.fieldnames or ()) != LABELS_MANIFEST_COLUMNS:
        raise StageError(f"{path}: columns {','.join(reader.fieldnames or [])}, not "
                         f"{','.join(LABELS_MANIFEST_COLUMNS)}; restore it with `dvc checkout {folder.name}.dvc`")
    return rows


def votes_text(votes: dict[str, str]) -> str:
    return ", ".join(f"{who} {label}" for who, label in sorted(votes.items()))


def plan(records: list[dict], folder: Path) -> Plan:
    """What committing ``records``' final labels into ``folder`` adds (module docstring)."""
    result = Plan(read_manifest(folder))
    by_sha = {row["sha256"]: row for row in result.kept}
    by_place = {(row["origin"], str(row["x"]), str(row["y"])): row for row in result.kept}
    decided = Decisions.replay(records).labelled()
    for tile, final in sorted(decided.items(), key=lambda kv: kv[1].record["id"] if kv[1].record else 0):
        if final.record is None:
            where = next(r for r in records if r["tile"] == tile)
            result.conflicts.append(f"{where['file']} x={where['x']} y={where['y']}: reviewers disagree "
                                    f"({votes_text(final.votes)}); left out until a third label settles it")
            continue
        record, label = final.record, final.label
        try:
            pixels = read_tile(record.get("path") or record["file"], int(record["x"]), int(record["y"]),
                               sha256=record["sha256"])
        except TileError as exc:
            result.unreadable.append(f"{exc} (left out)")
            continue
        png = png_bytes(pixels)
        digest = hashlib.sha256(png).hexdigest()
        place = (record["file"], str(record["x"]), str(record["y"]))
        earlier = by_sha.get(digest) or by_place.get(place)
        if earlier is not None:
            if earlier["label"] == label:
                result.already += 1
            else:
                result.conflicts.append(f"{record['file']} x={record['x']} y={record['y']}: labelled {label} now, "
                                        f"committed as {earlier['label']} ({earlier['file']}); left as committed")
            continue
        row = {"file": f"{label}_{digest[:16]}.png", "label": label, "sha256": digest, "origin": record["file"],
               "x": record["x"], "y": record["y"], "reviewer": record["reviewer"], "time": record["time"],
               "audit_id": record["id"], "model_version": record.get("model_version") or "unknown",
               "predicted": record.get("predicted", ""), "confidence": record.get("confidence", "")}
        result.new.append((row, png))
        by_sha[digest] = by_place[place] = row
    return result


def remove_dead_builds(folder: Path) -> None:
    """Remove ``.<folder>.<pid>.*.tmp`` builds beside ``folder`` whose writer was killed."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(\d+)\..+\.tmp")
    for leftover in folder.parent.glob(f".{folder.name}.*.tmp"):
        match = pattern.fullmatch(leftover.name)
        if match and not process_alive(int(match.group(1))) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: the images are on disk before the folder that names them is swapped in."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_folder(result: Plan, folder: Path) -> None:
    """The folder with ``result``'s new images and manifest, built beside it and swapped in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(folder)
    build = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    try:
        if folder.is_dir():
            shutil.copytree(folder, build, dirs_exist_ok=True)  # copies the content of DVC-linked files
        for path in build.iterdir():
            os.chmod(path, 0o644)  # DVC may have left the old files read-only
        for row, png in result.new:
            write_synced(build / row["file"], png)
        write_synced(build / LABELS_MANIFEST, result.manifest())
        replace_dir(build, folder)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def message(result: Plan) -> str:
    """The git commit message: ``labels: N images (alice 8, bob 4); data version V``."""
    people = ", ".join(f"{who} {n}" for who, n in result.reviewers().items())
    return f"labels: {len(result.new)} images ({people}); data version {result.version()}"


def commit(state: Path, labels: Path, workspace: Path, message_only: bool = False, git: bool = True,
           event: bool = True) -> str:
    """Commit the final labels of ``state``'s audit log into ``labels``; returns the summary line.

    Raises:
        StageError: no audit log, a damaged one, or a failed dvc / git step (naming the fix).
    """
    from neu_model.review import publish  # subprocess and Prefect code: not needed to plan

    log_file = state / AUDIT_FILE
    if not log_file.is_file():
        raise StageError(f"{log_file}: no audit log; review tiles with `neu-review serve PRED.csv` first, or pass "
                         "the --state folder it used")
    if git and not message_only:  # refused before anything is written
        publish.check_workspace(workspace, labels)
    result = plan(read_records(log_file), labels)
    for line in result.conflicts:
        print(f"conflict: {line}", file=sys.stderr)
    for line in result.unreadable:
        print(f"not committed: {line}", file=sys.stderr)
    if message_only:
        return message(result)
    if not result.new:
        version = result.version() if result.kept else "none"
        return (f"committed 0 labels: nothing new ({result.already} already committed, {len(result.conflicts)} "
                f"conflicts); data version {version}; git unchanged; event not sent (nothing new)")
    write_folder(result, labels)
    sha = "skipped (--no-git)"
    if git:
        sha, notes = publish.version_folder(workspace, labels, message(result))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    sent = "not sent (--no-event)"
    if event:
        trainable = sum(row["label"] != UNKNOWN_LABEL for row in [*result.kept, *(r for r, _ in result.new)])
        payload = {"count": len(result.new), "total": len(result.kept) + len(result.new), "trainable": trainable,
                   "data_version": result.version(), "reviewers": result.reviewers()}
        sent = publish.announce(workspace, payload)
    classes = ", ".join(f"{c} {n}" for c, n in result.classes().items())
    people = ", ".join(f"{who} {n}" for who, n in result.reviewers().items())
    return (f"committed {len(result.new)} labels ({classes}) by {people}; data version {result.version()}; "
            f"git {sha}; event {sent}")
