"""Where the defect is: every localisation method scored against NEU-DET's boxes, per class, on the
validation and test images, beside the calibration figures measured before this work.

    python benchmarks/bench_locate.py --model models/model.pt --split data/split.csv \\
        --images data/raw/NEU-CLS --boxes ../shared/data/NEU-DET-boxes.csv
    python benchmarks/bench_locate.py ... --search            # choose the knobs again, then score them
    python benchmarks/bench_locate.py ... --gallery reports/locate_gallery.png

Without ``--search`` the knobs are ``neu_model.localisation.methods.DEFAULT_LOCATE``; ``--search`` chooses them
again (``benchmarks/locate_search.py``) on the choosing images (``--choose-on``: the train and
validation parts by default, or the validation part alone) and prints them as a params.yaml
``locate:`` section. Boxes never train anything: they only score the candidate knobs. The test
part is scored once, with the chosen knobs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neu_model.core.config import CLASSES  # noqa: E402
from neu_model.data.dataset import load_split  # noqa: E402
from neu_model.data.neu_det import read_boxes  # noqa: E402
from neu_model.inference.torch_model import load_torch_model  # noqa: E402
from neu_model.localisation.methods import DEFAULT_LOCATE, METHODS, localisation_report  # noqa: E402

# Measured before this work on the 540 test images of the seed-0 split (boxes of the image's class).
CALIBRATION = {
    "whole-image box": {"box_accuracy": 0.146},
    "largest detrended component": {"box_accuracy": 0.257},
    "plain Grad-CAM, largest component": {"box_accuracy": "0.07-0.20", "pointing_max": 0.867},
    "plain Grad-CAM, all components": {"recall": "0.04-0.17", "precision": "<0.08"},
}
TARGET = {"box_accuracy": 0.50, "pointing": 0.95, "recall": 0.50, "precision": 0.50}
COLUMNS = ["box_accuracy", "recall", "precision", "pointing", "pointing_strict", "pointing_max",
           "pointing_max_strict"]


def table(report: dict) -> pd.DataFrame:
    """One row per method and class (``all`` first), the figures of ``locate.localisation_figures`` in percent."""
    rows = []
    for method, figures in report["methods"].items():
        for code, values in [("all", figures["overall"]), *figures["classes"].items()]:
            rows.append({"method": method, "class": code, "images": values["images"], "boxes": values["boxes"],
                         "regions": values["regions"], **{c: round(100 * values[c], 1) for c in COLUMNS}})
    return pd.DataFrame(rows)


def score_split(model, split: str, args, params) -> tuple[dict, pd.DataFrame]:
    data = load_split(split, args.split, args.images)
    report = localisation_report(model, data.images, data.labels, data.files, args.boxes_table, params, METHODS)
    return report, table(report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/model.pt")
    parser.add_argument("--split", type=Path, default=ROOT / "data/split.csv")
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    parser.add_argument("--boxes", default=str(ROOT.parent / "shared/data/NEU-DET-boxes.csv"))
    parser.add_argument("--search", action="store_true", help="choose the knobs again before scoring")
    parser.add_argument("--choose-on", choices=["trainval", "val"], default="trainval")
    parser.add_argument("--min-precision", type=float, default=0.55,
                        help="the search keeps more regions per image while precision stays above this")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the search's model-free first step in this JSON file (reused when the grid matches)")
    parser.add_argument("--gallery", type=Path, default=None, help="write the test overlays gallery here")
    parser.add_argument("--json", type=Path, default=None, help="also write both reports here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.boxes_table = read_boxes(args.boxes)
    model, _ = load_torch_model(args.model)
    params, rule = DEFAULT_LOCATE, ("neu_model.localisation.methods.DEFAULT_LOCATE (chosen earlier by --search on "
                                    "train+val)")
    if args.search:
        from locate_search import search

        start = time.perf_counter()
        params, rule, section = search(model, args, args.choose_on, args.min_precision)
        print(f"# search on {args.choose_on}: {time.perf_counter() - start:.0f} s\n\nlocate:")
        print("  " + yaml.safe_dump(section, sort_keys=False, default_flow_style=None).replace("\n", "\n  "))
    print(f"knobs: {rule}")
    print(f"target: {TARGET}; calibration (test): {json.dumps(CALIBRATION)}\n")
    reports = {}
    for split in ("val", "test"):
        report, frame = score_split(model, split, args, params)
        reports[split] = report
        print(f"## {split}: {report['images']} images, chosen method {report['chosen']} (figures in %)\n")
        print(frame.to_markdown(index=False))
        print()
    if args.gallery:
        from neu_model.localisation.gallery import locate_gallery

        test = load_split("test", args.split, args.images)
        shown = locate_gallery(model, test.images, test.labels, test.files, args.boxes_table, args.gallery, params)
        print(f"gallery of {len(shown)} test images: {args.gallery}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    print("classes:", ", ".join(CLASSES))


if __name__ == "__main__":
    main()
