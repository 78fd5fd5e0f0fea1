"""Write the non-steel tiles of ``neu_model.data.foreign`` as PNG files, to try the unknown flag by hand.

    python benchmarks/write_foreign_tiles.py --out foreign/          # from the test part's images
    neu-predict foreign/ --model models/model.pt --out foreign.csv    # then: the unknown column

One folder per set (``photos/``, ``textures/``, ``synthetic/``, ``wrong_scale/``,
``misdecoded/``), the derived sets made from the test part of ``data/split.csv``, as the
evaluate stage makes them. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neu_model.data.dataset import load_split  # noqa: E402
from neu_model.data.foreign import foreign_sets  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", type=Path, default=ROOT / "data/split.csv")
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    args = parser.parse_args(argv)
    test = load_split("test", args.split, args.images)
    files = [(args.images / f).read_bytes() for f in test.files]
    for name, tiles in foreign_sets(test.images.numpy(), files).items():
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, tile in enumerate(tiles[:, 0]):
            Image.fromarray(tile).save(folder / f"{name}_{i:03d}.png")
        print(f"{folder}: {len(tiles)} tiles")


if __name__ == "__main__":
    main()
