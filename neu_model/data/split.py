"""Stage ``split``: train/val/test parts that never move an image, driven by the one seed.

An image's part depends on the image alone (its sha256), the seed and ``split.*``, never on which
other images are there, so adding images (a plant's labels, ``neu_model.data.labels``) moves none
of the images already split, on any machine:

- an image of the public NEU-CLS set (its sha256 in ``data.checksums``, the list in git) takes
  its part in the public set's stratified split (``stratified_parts``, computed from that list:
  the 1,260/540 protocol, exactly as before images could be added);
- any other image takes its part from a hash of its sha256 and the seed: test with probability
  ``split.test_fraction``, then val with ``split.val_fraction`` of the rest, else train.

Byte-identical images (same sha256, e.g. Pa_101 and Pa_105) therefore always share a part, so a
test image is never also a training image.

    python -m neu_model.data.split [--set split.val_fraction=0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import random
import sys
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from neu_model.core.config import Config, SplitConfig, add_config_args, load_config
from neu_model.core.files import write_text
from neu_model.core.paths import MANIFEST, ROOT, SPLIT_FILE
from neu_model.core.stage import StageError, run_stage
from neu_model.data.checks import read_checksums
from neu_model.data.dataset import read_manifest

log = logging.getLogger("neu_model.data.split")


def _take(groups: list[list[str]], target: int) -> tuple[list[str], list[list[str]]]:
    """Take whole groups from the front until ``target`` files are taken."""
    taken: list[str] = []
    rest: list[list[str]] = []
    for group in groups:
        if len(taken) < target:
            taken.extend(group)
        else:
            rest.append(group)
    return taken, rest


def stratified_parts(manifest: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.DataFrame:
    """The public set's split: per class, whole groups of identical images shuffled by the seed,
    ``test_fraction`` of the class to test, ``val_fraction`` of the rest to val.

    Args:
        manifest: rows with ``file``, ``label`` and ``sha256``.
        cfg: the test fraction (of each class) and val fraction (of each class's training part).
        seed: the project seed; the same seed and manifest give the same split.

    Returns:
        A frame with columns ``file, label, split``, sorted by file.
    """
    rng = random.Random(seed)
    parts: dict[str, str] = {}
    for label in sorted(manifest["label"].unique()):
        rows = manifest[manifest["label"] == label].sort_values("file")
        by_hash: dict[str, list[str]] = {}
        for file, digest in zip(rows["file"], rows["sha256"], strict=True):
            by_hash.setdefault(digest, []).append(file)
        groups = sorted(by_hash.values())
        rng.shuffle(groups)
        n = len(rows)
        test, groups = _take(groups, round(n * cfg.test_fraction))
        val, groups = _take(groups, round((n - len(test)) * cfg.val_fraction))
        for name, files in (("test", test), ("val", val), ("train", [f for g in groups for f in g])):
            parts.update(dict.fromkeys(files, name))
    table = manifest[["file", "label"]].copy()
    table["split"] = table["file"].map(parts)
    return table.sort_values("file").reset_index(drop=True)


def hashed_part(sha256: str, cfg: SplitConfig, seed: int) -> str:
    """The part of an image outside the public set: a uniform number from its sha256 and the seed."""
    draw = int(hashlib.sha256(f"neu-split:{seed}:{sha256}".encode()).hexdigest()[:15], 16) / 16**15
    if draw < cfg.test_fraction:
        return "test"
    return "val" if draw < cfg.test_fraction + (1 - cfg.test_fraction) * cfg.val_fraction else "train"


def public_parts(checksums: Path, cfg: SplitConfig, seed: int) -> dict[str, str]:
    """{sha256: part} of every image of the public set, from its checksum list (class from the name)."""
    sums = read_checksums(checksums)
    frame = pd.DataFrame({"file": list(sums), "label": [name.split("_")[0] for name in sums],
                          "sha256": list(sums.values())})
    table = stratified_parts(frame, cfg, seed)
    return dict(zip(frame.sort_values("file")["sha256"], table["split"], strict=True))


def split_frame(manifest: pd.DataFrame, cfg: SplitConfig, seed: int,
                public: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Assign every manifest row to train, val or test (module docstring: the rule).

    Args:
        manifest: rows with ``file``, ``label`` and ``sha256`` (and ``origin``, kept when present).
        cfg: the test fraction and val fraction.
        seed: the project seed.
        public: {sha256: part} of the public set (``public_parts``); None: none is public.

    Returns:
        A frame with columns ``file, label, split`` (and ``origin``), sorted by file.
    """
    public = public or {}
    table = manifest[[c for c in ("file", "label", "origin") if c in manifest]].copy()
    table.insert(2, "split", [public.get(d) or hashed_part(d, cfg, seed) for d in manifest["sha256"]])
    return table.sort_values("file").reset_index(drop=True)


def split(cfg: Config, manifest_path: Path = MANIFEST, out: Path = SPLIT_FILE) -> pd.DataFrame:
    """Split the downloaded set and write ``data/split.csv`` atomically."""
    manifest = read_manifest(manifest_path)
    if manifest.empty:
        raise StageError(f"{manifest_path}: no images listed; run the download stage again")
    table = split_frame(manifest, cfg.split, cfg.seed, public_parts(ROOT / cfg.data.checksums, cfg.split, cfg.seed))
    empty = [s for s in ("train", "test") if not (table["split"] == s).any()]
    if empty:
        raise StageError(f"{manifest_path}: too few images for a {'/'.join(empty)} part; add images or change split.*")
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    write_text(out, buf.getvalue())
    return table


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--out", type=Path, default=SPLIT_FILE)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    table = split(cfg, args.manifest, args.out)
    log.info("wrote %s (seed %d)\n%s", args.out, cfg.seed, part_counts(table).to_string())


def part_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Images per part and class (and origin, when the table has one): what the log shows."""
    rows = ["origin", "split"] if "origin" in table else ["split"]
    counts = table.groupby([*rows, "label"]).size().unstack(fill_value=0)
    counts["all"] = counts.sum(axis=1)
    return counts


if __name__ == "__main__":
    sys.exit(run_stage(main))
