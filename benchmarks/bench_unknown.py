"""Unknown input: every candidate score over the models of ``bench_models.py``, one table.

    python benchmarks/bench_models.py --models defectnet --seeds 0 1 2 3 4 5 6 7 8 9 --no-robustness \
        --workdir <dir> --reuse                                    # the ten models, once
    python benchmarks/bench_unknown.py --workdir <dir> --seeds 0 1 2 3 4 5 6 7 8 9 --part val   # choose
    python benchmarks/bench_unknown.py --workdir <dir> --seeds 0 1 2 3 4 5 6 7 8 9 --part test \
        --methods mahalanobis                                      # report the chosen one

For each seed's model and split: the statistics of each method are fitted on the training part,
its threshold flags ``--flag-share`` of the validation part, and the scores of ``--part``
(validation to choose, test to report) are compared with the non-steel sets of
``neu_model.data.foreign`` (derived from that part's images) and with that part under the
robustness suite. Per method and set: AUROC (steel against the set), FPR@95 (the share of steel
flagged at the threshold that flags 95 % of the set) and the share flagged at the threshold;
means over seeds, and the spread (min–max) of the overall figures. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neu_model.data import corruptions  # noqa: E402
from neu_model.data.dataset import load_split, to_float  # noqa: E402
from neu_model.data.foreign import foreign_sets  # noqa: E402
from neu_model.evaluation.unknown_metrics import set_figures  # noqa: E402
from neu_model.inference.torch_model import load_torch_model  # noqa: E402
from neu_model.inference.unknown import UnknownScorer, fit_statistics, network_outputs, threshold_at  # noqa: E402

CANDIDATES = {"msp": ("msp", 1), "energy": ("energy", 1), "maxlogit": ("maxlogit", 1),
              "mahalanobis": ("mahalanobis", 1), "knn1": ("knn", 1), "knn10": ("knn", 10), "layers": ("layers", 1)}


def corrupted(images: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8) under every case of the robustness suite, as evaluate builds it."""
    clean = to_float(images)
    cases = [(corruptions.corrupt(clean, name, s) * 255).round().to(torch.uint8)
             for name, (_, severities) in corruptions.SUITE.items() for s in severities]
    return torch.cat(cases)


def seed_rows(work: Path, seed: int, part: str, methods: list[str], flag_share: float, images: Path) -> list[dict]:
    split = work / f"split-seed{seed}.csv"
    net = load_torch_model(work / f"defectnet-seed{seed}" / "model.pt")[0]
    train, val = load_split("train", split, images), load_split("val", split, images)
    steel = val if part == "val" else load_split("test", split, images)
    files = [(images / f).read_bytes() for f in steel.files]
    sets = foreign_sets(steel.images.numpy(), files) | {"corrupted": corrupted(steel.images).numpy()}
    taps = "layers" in methods
    train_out, val_out = (network_outputs(net, to_float(s.images), taps=taps) for s in (train, val))
    steel_out = val_out if part == "val" else network_outputs(net, to_float(steel.images), taps=taps)
    set_out = {name: network_outputs(net, to_float(torch.from_numpy(x)), taps=taps) for name, x in sets.items()}
    rows = []
    for label in methods:
        method, k = CANDIDATES[label]
        stats = fit_statistics(method, train_out[1], train.labels, train_out[0].shape[1], k, train_out[2])
        scorer = UnknownScorer(stats | {"threshold": 0.0})
        threshold = threshold_at(scorer(*val_out), flag_share)
        steel_scores = scorer(*steel_out).numpy()
        scores = {name: scorer(*out).numpy() for name, out in set_out.items()}
        foreign = np.concatenate([s for name, s in scores.items() if name != "corrupted"])
        for name, s in [*scores.items(), ("all non-steel", foreign)]:
            rows.append({"seed": seed, "method": label, "set": name, "n": len(s),
                         **set_figures(steel_scores, s, threshold), "steel_flagged_%": 100 * float(
                             (steel_scores > threshold).mean())})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="bench_models.py's --workdir")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--part", choices=["val", "test"], default="val")
    parser.add_argument("--methods", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--flag-share", type=float, default=0.01)
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    parser.add_argument("--out", type=Path, default=None, help="also write every row as CSV here")
    parser.add_argument("--rows", type=Path, nargs="+", default=None,
                        help="print the table of rows written before by --out (several runs' seeds together)")
    args = parser.parse_args(argv)
    if args.rows:
        table = pd.concat([pd.read_csv(f) for f in args.rows], ignore_index=True)
        table = table[table["method"].isin(args.methods) & table["seed"].isin(args.seeds)]
    else:
        rows = []
        for seed in args.seeds:
            print(f"# seed {seed} ...", file=sys.stderr, flush=True)
            rows += seed_rows(args.workdir, seed, args.part, args.methods, args.flag_share, args.images)
        table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, index=False)
    figures = ["auroc", "fpr95_%", "flagged_%", "steel_flagged_%"]
    means = table.groupby(["method", "set"], sort=False)[figures].mean().round(3).reset_index()
    seeds = " ".join(map(str, sorted(table["seed"].unique())))
    print(f"\n{args.part} part, seeds {seeds}, threshold: validation flags "
          f"{100 * args.flag_share:g} %\n")
    print(means.to_markdown(index=False))
    overall = table[table["set"].isin(["all non-steel", "corrupted"])]
    spread = overall.groupby(["method", "set"], sort=False)[["auroc", "flagged_%", "steel_flagged_%"]].agg(
        ["min", "max"]).round(3)
    print("\nspread over seeds (min, max):\n")
    print(spread.to_markdown())


if __name__ == "__main__":
    main()
