"""The review queue: which tiles of ``neu-predict`` CSVs a person looks at, in which order.

Every row flagged ``needs_review`` (error rows skipped: they have no tile) is queued: tiles
flagged ``unknown`` first of all (unlike anything the model was trained on), then the rest
least confident first. Then a share of the confident tiles, drawn at random with a fixed seed
and marked ``audit``: the model's confident mistakes (escapes) are invisible otherwise.

A tile is ``<sha256 of its image's bytes>:<x>:<y>``: the same tile in two CSVs (or the same
image under two names) is one item. Each image is hashed once at start; an image whose file is
newer than the CSV that scored it is kept in the queue but refused (``Tile.changed``): the CSV
no longer describes it.

The model version shown for a CSV is the ``model`` of its sidecar ``<csv>.model.json``
(written by ``neu-predict --out``), else "unknown".
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neu_model.core.config import CLASSES
from neu_model.core.stage import StageError
from neu_model.inference.input_files import tar_members
from neu_model.inference.tiles import CSV_COLUMNS, LOCATE_COLUMN
from neu_model.review.tiles import Origin, TileError, locate, read_bytes, sha256_bytes

REVIEW, AUDIT = "review", "audit"
UNKNOWN_MODEL = "unknown"
REQUIRED = ("file", "x", "y", "predicted", "confidence", "needs_review", *(f"p_{c}" for c in CLASSES), "error")

log = logging.getLogger("neu_model.review.queue")


@dataclass
class Tile:
    """One queue item: a tile, what the model said about it, and where it lives."""

    id: int  # its place in the queue: the page asks for tiles by this, never by path
    key: str
    origin: Origin
    x: int
    y: int
    sha256: str
    predicted: str
    confidence: float
    probs: dict[str, float]
    unknown_score: float | None
    unknown: bool
    boxes: list | None
    queue: str
    model_version: str
    csv: Path
    changed: str = ""  # why the tile is refused ("" when it is not)

    def top(self, n: int = 2) -> list[tuple[str, float]]:
        return [(c, round(p, 4)) for c, p in sorted(self.probs.items(), key=lambda kv: -kv[1])[:n]]


@dataclass
class Queue:
    """The tiles, review ones then audit ones, and what was left out on loading (one line each)."""

    tiles: list[Tile]
    notes: list[str] = field(default_factory=list)

    def by_key(self) -> dict[str, Tile]:
        return {t.key: t for t in self.tiles}


def model_version(csv_path: Path) -> str:
    """The ``model`` of ``<csv>.model.json``; "unknown" without a readable one."""
    try:
        value = json.loads(Path(f"{csv_path}.model.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return UNKNOWN_MODEL
    return str(value) if value else UNKNOWN_MODEL


def truthy(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes")


def read_rows(path: Path) -> list[dict]:
    """The rows of one predictions CSV.

    Raises:
        StageError: missing, or not a neu-predict CSV.
    """
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StageError(f"{path}: cannot be read ({exc}); name a CSV written by neu-predict --out") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise StageError(f"{path}: no column {', '.join(missing)}; name a CSV written by neu-predict "
                         f"(columns {','.join(CSV_COLUMNS)})")
    return rows


def parse_row(row: dict, csv_path: Path, version: str) -> dict:
    """A CSV row's fields as the queue keeps them (x, y ints, probabilities floats, boxes a list)."""
    score = row.get("unknown_score", "")
    boxes = row.get(LOCATE_COLUMN) or None
    return {"x": int(float(row["x"])), "y": int(float(row["y"])), "predicted": row["predicted"],
            "confidence": float(row["confidence"]), "probs": {c: float(row[f"p_{c}"]) for c in CLASSES},
            "unknown_score": float(score) if score not in ("", None) else None,
            "unknown": truthy(row.get("unknown", "")), "boxes": json.loads(boxes) if boxes else None,
            "model_version": version, "csv": csv_path, "needs_review": truthy(row["needs_review"])}


def image_hash(origin: Origin, cache: dict[tuple, str]) -> str:
    """The sha256 of an image's bytes, computed once per file or member."""
    key = (origin.path, origin.member)
    if key not in cache and origin.member and not origin.path.name.lower().endswith(".zip"):
        # A tar is read as a stream: hash all its members in one pass, not one pass per member.
        for member in tar_members(origin.path):
            if member.data is not None:
                cache[(origin.path, member.name[len(str(origin.path)) + 1:])] = sha256_bytes(member.data)
    if key not in cache:
        cache[key] = sha256_bytes(read_bytes(origin))
    return cache[key]


def load_queue(csvs: Sequence[Path], random_share: float = 0.02, seed: int = 0) -> Queue:
    """The queue of the CSVs' tiles (module docstring).

    Raises:
        StageError: a CSV that is missing or not neu-predict's.
    """
    notes: list[str] = []
    hashes: dict[tuple, str] = {}
    origins: dict[tuple[str, Path], Origin | None] = {}
    found: dict[str, dict] = {}
    for csv_path in map(Path, csvs):
        rows = read_rows(csv_path)
        version, stamp = model_version(csv_path), csv_path.stat().st_mtime
        for number, row in enumerate(rows, 2):
            if row.get("error"):
                continue
            try:
                fields = parse_row(row, csv_path, version)
            except (ValueError, KeyError, TypeError) as exc:
                notes.append(f"{csv_path}:{number}: unreadable row ({exc}); skipped")
                continue
            place = (row["file"], csv_path.parent)
            if place not in origins:
                try:
                    origins[place] = locate(row["file"], csv_path.parent)
                except TileError as exc:
                    origins[place] = None
                    notes.append(f"{exc} (its tiles are skipped)")
            origin = origins[place]
            if origin is None:
                continue
            try:
                digest = image_hash(origin, hashes)
            except TileError as exc:
                notes.append(f"{exc} (its tiles are skipped)")
                origins[place] = None
                continue
            key = f"{digest}:{fields['x']}:{fields['y']}"
            changed = ""
            if origin.path.stat().st_mtime > stamp:
                changed = f"{row['file']}: changed on disk after {csv_path} was written; run neu-predict on it again"
            earlier = found.get(key)
            # One item per tile: a flag from any CSV wins, then the first CSV's row.
            if earlier is None or (fields["needs_review"] and not earlier["needs_review"]):
                found[key] = {**fields, "key": key, "origin": origin, "sha256": digest, "changed": changed}
    return Queue(ordered(found.values(), random_share, seed), notes)


def ordered(items, random_share: float, seed: int) -> list[Tile]:
    """Flagged items (unknown first, then least confident), then the audit draw of the rest."""
    items = list(items)
    flagged = sorted((i for i in items if i["needs_review"]), key=lambda i: (not i["unknown"], i["confidence"],
                                                                            i["key"]))
    confident = sorted((i for i in items if not i["needs_review"]), key=lambda i: i["key"])
    share = min(max(random_share, 0.0), 1.0)
    drawn = random.Random(seed).sample(confident, math.ceil(share * len(confident))) if confident and share else []
    tiles = []
    for queue, group in ((REVIEW, flagged), (AUDIT, drawn)):
        for item in group:
            fields = {k: v for k, v in item.items() if k != "needs_review"}
            tiles.append(Tile(id=len(tiles), queue=queue, **fields))
    return tiles


def check_tile_now(tile: Tile, digest: str) -> str:
    """Why ``tile`` is refused now: its image's bytes hash to ``digest`` now ("" when they still
    match and its file is not newer than its CSV)."""
    if tile.changed:
        return tile.changed
    try:
        newer = tile.origin.path.stat().st_mtime > tile.csv.stat().st_mtime
    except OSError as exc:
        return f"{tile.origin.ref}: cannot be read ({exc.strerror}); put the file back"
    if newer or digest != tile.sha256:
        return f"{tile.origin.ref}: changed on disk since it was predicted; run neu-predict on it again"
    return ""

