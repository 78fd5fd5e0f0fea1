"""Stage ``split``: a deterministic, stratified train/val/test split driven by the one seed.

Byte-identical images (same sha256, e.g. Pa_101 and Pa_105) form one group and always land in
the same part, so a test image is never also a training image.

    python -m neu_model.data.split [--set split.val_fraction=0.1]
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from neu_model.core.config import Config, SplitConfig, add_config_args, load_config
from neu_model.core.files import write_text
from neu_model.core.paths import MANIFEST, SPLIT_FILE
from neu_model.core.stage import StageError, run_stage
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


def split_frame(manifest: pd.DataFrame, cfg: SplitConfig, seed: int) -> pd.DataFrame:
    """Assign every manifest row to train, val or test.

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


def split(cfg: Config, manifest_path: Path = MANIFEST, out: Path = SPLIT_FILE) -> pd.DataFrame:
    """Split the downloaded set and write ``data/split.csv`` atomically."""
    manifest = read_manifest(manifest_path)
    if manifest.empty:
        raise StageError(f"{manifest_path}: no images listed; run the download stage again")
    table = split_frame(manifest, cfg.split, cfg.seed)
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
    counts = table.groupby(["split", "label"]).size().unstack(fill_value=0)
    log.info("wrote %s (seed %d)\n%s", args.out, cfg.seed, counts.to_string())


if __name__ == "__main__":
    sys.exit(run_stage(main))
