"""The review in progress: who is looking at which tile, and what the audit log has decided.

No tile is handed to two reviewers at once: handing it out (``claim``) leases it to one
reviewer for ``LEASE_SECONDS``, renewed by every key press of theirs, and freed by their
decision. Leases live in memory only; a restarted server starts without any, and rebuilds
everything else from the audit log (labelled tiles are not shown again).

A tile is offered to a reviewer when nobody has labelled it (and they did not skip it), or when
its reviewers disagree and they are not one of them: a conflict goes first, to a third person,
whose label makes a majority. A decision for a tile whose lease expired meanwhile is still
recorded: if it disagrees with another, that is a conflict, shown on the page and kept out of
``neu-review commit`` until settled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from neu_model.inference.tiles import TILE_SIZE
from neu_model.review.auditlog import LABELS, AuditLog, Decisions
from neu_model.review.queue import AUDIT, Queue, Tile, check_tile_now
from neu_model.review.tiles import ImageCache, TileError, context_png, png_bytes, tile_of

# Long enough to look closely at a hard tile, short enough that a reviewer who walked away does
# not hold their prefetched tiles for long.
LEASE_SECONDS = 120.0
AHEAD = 3  # tiles a page holds: the one shown and the next ones, prefetched


class Refused(Exception):
    """A request the review cannot carry out; the message is one line for the page."""


class ReviewSession:
    """The queue, the audit log and the leases of one ``neu-review serve``.

    Args:
        queue: the tiles.
        log: the audit log of the state folder (its records are replayed).
        lease_seconds: how long a handed-out tile stays reserved without a key press.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, queue: Queue, log: AuditLog, lease_seconds: float = LEASE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue, self.log, self.lease_seconds, self.clock = queue, log, lease_seconds, clock
        self.tiles = queue.tiles
        self.decisions = Decisions.replay(log.records)
        self.leases: dict[int, tuple[str, float]] = {}  # tile id -> (reviewer, expiry)
        self.images = ImageCache()
        self._lock = threading.RLock()

    def tile(self, tile_id: int) -> Tile:
        if not 0 <= tile_id < len(self.tiles):
            raise Refused(f"no tile {tile_id} in the queue (it has {len(self.tiles)}); reload the page")
        return self.tiles[tile_id]

    def counts(self, reviewer: str = "") -> dict:
        """What the page's counter shows: tiles reviewed, left, in conflict, refused; audit escapes."""
        with self._lock:
            reviewed = left = conflicts = changed = audited = escapes = 0
            for tile in self.tiles:
                final = self.decisions.final(tile.key)
                if final.label is not None:
                    reviewed += 1
                    if tile.queue == AUDIT:
                        audited += 1
                        escapes += final.label != tile.predicted
                elif final.conflict:
                    conflicts += 1
                elif tile.changed:
                    changed += 1
                else:
                    left += 1
            return {"total": len(self.tiles), "reviewed": reviewed, "left": left, "conflicts": conflicts,
                    "changed": changed, "audited": audited, "escapes": escapes,
                    "skipped": len(self.decisions.skipped.get(reviewer, ()))}

    def _free_for(self, tile: Tile, reviewer: str, now: float) -> bool:
        holder = self.leases.get(tile.id)
        return holder is None or holder[0] == reviewer or holder[1] <= now

    def _wanted_by(self, tile: Tile, reviewer: str) -> bool:
        if tile.changed:
            return False
        final = self.decisions.final(tile.key)
        if final.label is not None:
            return False
        if final.conflict:
            return reviewer not in final.votes
        return tile.key not in self.decisions.skipped.get(reviewer, ())

    def claim(self, reviewer: str, holding: list[int], ahead: int = AHEAD) -> tuple[list[int], list[dict]]:
        """Renew the reviewer's leases of ``holding`` and lease new tiles up to ``ahead`` in all.

        Returns:
            The ids of ``holding`` still theirs, in order, and the page data of the new tiles.
        """
        with self._lock:
            now = self.clock()
            keep = [i for i in dict.fromkeys(holding) if 0 <= i < len(self.tiles)
                    and self._free_for(self.tiles[i], reviewer, now) and self._wanted_by(self.tiles[i], reviewer)]
            for tile_id in keep:
                self.leases[tile_id] = (reviewer, now + self.lease_seconds)
            added: list[Tile] = []
            conflicts_first = sorted(self.tiles, key=lambda t: not self.decisions.final(t.key).conflict)
            for tile in conflicts_first:
                if len(keep) + len(added) >= ahead:
                    break
                if tile.id not in keep and self._free_for(tile, reviewer, now) and self._wanted_by(tile, reviewer):
                    self.leases[tile.id] = (reviewer, now + self.lease_seconds)
                    added.append(tile)
            return keep, [self.info(t) for t in added]

    def info(self, tile: Tile) -> dict:
        """What the page shows of a tile (no path: images are asked for by ``id``)."""
        final = self.decisions.final(tile.key)
        boxes = [[max(x0 - tile.x, 0), max(y0 - tile.y, 0), min(x1 - tile.x, TILE_SIZE), min(y1 - tile.y, TILE_SIZE),
                  score] for x0, y0, x1, y1, score in (tile.boxes or [])]
        return {"id": tile.id, "file": tile.origin.ref, "x": tile.x, "y": tile.y, "predicted": tile.predicted,
                "confidence": tile.confidence, "top": tile.top(2), "unknown_score": tile.unknown_score,
                "unknown": tile.unknown, "queue": tile.queue, "model_version": tile.model_version,
                "boxes": [b for b in boxes if b[2] > b[0] and b[3] > b[1]] if tile.boxes is not None else None,
                "conflict": final.votes if final.conflict else None}

    def _check_now(self, tile: Tile):
        """The tile's decoded image; refused when its file changed since it was predicted."""
        try:
            digest, image = self.images.get(tile.origin)
        except TileError as exc:
            tile.changed = str(exc)
            raise Refused(str(exc)) from None
        reason = check_tile_now(tile, digest)
        if reason:
            tile.changed = reason
            raise Refused(reason)
        return image

    def image(self, tile_id: int, context: bool = False) -> bytes:
        """The tile's PNG (200x200, as the model saw it) or its outlined neighbourhood's."""
        tile = self.tile(tile_id)
        image = self._check_now(tile)
        return context_png(image, tile.x, tile.y) if context else png_bytes(tile_of(image, tile.x, tile.y))

    def _record(self, tile: Tile, reviewer: str, kind: str, **fields) -> dict:
        path = f"{tile.origin.path}:{tile.origin.member}" if tile.origin.member else str(tile.origin.path)
        record = self.log.append({"kind": kind, "tile": tile.key, "file": tile.origin.ref, "x": tile.x, "y": tile.y,
                                  "sha256": tile.sha256, "reviewer": reviewer, "model_version": tile.model_version,
                                  "predicted": tile.predicted, "confidence": tile.confidence, "queue": tile.queue,
                                  "path": path, **fields})
        self.decisions.apply(record)
        return record

    def decide(self, reviewer: str, tile_id: int, kind: str, label: str | None = None,
               seconds: float | None = None) -> dict:
        """Record a label (``label`` one of ``LABELS``) or a skip; returns the audit record.

        Raises:
            Refused: an unknown tile or label, or a tile whose file changed since it was predicted.
        """
        tile = self.tile(tile_id)
        if kind == "label" and label not in LABELS:
            raise Refused(f"label {label!r} is not one of {', '.join(LABELS)}")
        if kind not in ("label", "skip"):
            raise Refused(f"kind {kind!r} is neither label nor skip")
        if kind == "label":
            self._check_now(tile)
        with self._lock:
            record = self._record(tile, reviewer, kind, label=label if kind == "label" else None,
                                  seconds=None if seconds is None else round(float(seconds), 3))
            self.leases.pop(tile.id, None)
            return record

    def undo(self, reviewer: str) -> tuple[dict, dict]:
        """Take back the reviewer's last decision not undone; the tile is theirs again.

        Returns:
            The undo record, and the page data of its tile (shown again).

        Raises:
            Refused: nothing to undo.
        """
        with self._lock:
            last = self.decisions.last_decision(reviewer)
            if last is None:
                raise Refused(f"nothing of {reviewer}'s to undo")
            tile = next((t for t in self.tiles if t.key == last["tile"]), None)
            if tile is None:  # decided under another queue (other CSVs): undone, not shown
                record = self.log.append({**last, "kind": "undo", "undoes": last["id"], "seconds": None,
                                          "time": None, "reviewer": reviewer})
                self.decisions.apply(record)
                return record, {}
            record = self._record(tile, reviewer, "undo", label=last["label"], undoes=last["id"])
            self.leases[tile.id] = (reviewer, self.clock() + self.lease_seconds)
            return record, self.info(tile)
