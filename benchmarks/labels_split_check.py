"""Add labelled images to the real data and count which images change part.

Downloads the source (NEU_DATA_SOURCE or data.source) into a temporary workspace, splits it, adds
a labels folder of ``--per-class`` new images a class (darker, noisier copies of source images
that are not in the public checksum list: new bytes) as ``neu-review commit`` writes it, then
downloads and splits again. Prints how many of the images already split changed part under the
split rule (``neu_model.data.split``) and, for comparison, under a stratified split recomputed
over whatever images are there (the rule before labels could be added), the parts of the new
images and the per-class counts after the addition.

    python benchmarks/labels_split_check.py [--per-class 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from neu_model.core.config import DATA_SOURCE_ENV, load_config
from neu_model.core.paths import ROOT
from neu_model.data.download import download
from neu_model.data.labels import LABELS_MANIFEST_COLUMNS
from neu_model.data.split import part_counts, split, stratified_parts


def altered(path: Path, seed: int) -> np.ndarray:
    """A darker copy with a little sensor noise: a tile the line might send, not a public image."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) * 0.85
    return np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)


def write_labels(folder: Path, images: list[tuple[str, np.ndarray, str]]) -> None:
    folder.mkdir(parents=True)
    rows = []
    for i, (label, pixels, origin) in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        digest = hashlib.sha256(buf.getvalue()).hexdigest()
        name = f"{label}_{digest[:16]}.png"
        (folder / name).write_bytes(buf.getvalue())
        rows.append({"file": name, "label": label, "sha256": digest, "origin": origin, "x": 0, "y": 0,
                     "reviewer": "benchmark", "time": "", "audit_id": i + 1, "model_version": "",
                     "predicted": "", "confidence": ""})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, LABELS_MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = [f"seed={args.seed}", "data.expected_per_class=any"]
    source = load_config(ROOT / "params.yaml", overrides).data.source
    if Path(source).exists():  # a local folder named relative to here: the same folder from the workspace
        os.environ[DATA_SOURCE_ENV] = str(Path(source).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = load_config(ROOT / "params.yaml", overrides)
        download(cfg)
        before = split(cfg).set_index("file")
        source = Path(cfg.data.source)
        picks = [(c, source / f"{c}_{n}.bmp") for c in cfg.data.classes for n in range(1, args.per_class + 1)]
        write_labels(Path("labels"), [(c, altered(p, i), f"{p.name} (altered)") for i, (c, p) in enumerate(picks)])
        result = download(cfg)
        after = split(cfg).set_index("file")
        moved = int((after.loc[before.index, "split"] != before["split"]).sum())
        manifest = pd.read_csv("data/raw/manifest.csv")
        old_rule = stratified_parts(manifest, cfg.split, cfg.seed).set_index("file")["split"]
        old_moved = int((old_rule[before.index] != before["split"]).sum())
        new = after[after["origin"] == "plant"]
        print(f"data: {cfg.data.source} ({len(before)} images), seed {cfg.seed}; added {result.plant} labelled images")
        print(f"images already split that change part: {moved} of {len(before)} (split rule); "
              f"{old_moved} of {len(before)} under a stratified split recomputed over all images")
        print("parts of the added images:", {k: int(v) for k, v in new["split"].value_counts().sort_index().items()})
        print(part_counts(after.reset_index()).to_string())


if __name__ == "__main__":
    main()
