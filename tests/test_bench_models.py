"""benchmarks/bench_models.py --mirror-eval: each model scored with and without mirror averaging,
and with --reuse evaluated again without training again."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from neu_model.core.paths import ROOT

pytestmark = pytest.mark.slow  # one 1-epoch training on the fixture and a few evaluations


def bench(tiny_data, workdir, out, *extra: str) -> pd.DataFrame:
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--models", "defectnet", "--seeds", "0",
               "--epochs", "1", "--images", str(tiny_data.images), "--manifest", str(tiny_data.raw / "manifest.csv"),
               "--workdir", str(workdir), "--out", str(out), "--no-robustness", "--mirror-eval", "--threads", "1",
               "--set", "data.expected_per_class=any", "--set", "train.recipes.defectnet.batch_size=8", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(out)


def figures(predictions_csv) -> dict:
    """Errors, In<->PS confusions and review share, recounted from a predictions.csv."""
    frame = pd.read_csv(predictions_csv)
    wrong = frame[frame["label"] != frame["predicted"]]
    in_ps = wrong[wrong["label"].isin(["In", "PS"]) & wrong["predicted"].isin(["In", "PS"])]
    return {"errors": len(wrong), "in_ps": len(in_ps), "review": frame["needs_review"].mean()}


def test_mirror_eval_adds_both_columns_and_reuse_only_reevaluates(tiny_data, tmp_path):
    work = tmp_path / "work"
    first = bench(tiny_data, work, tmp_path / "first.csv")
    model = work / "defectnet-seed0" / "model.pt"
    trained = model.read_bytes()
    plain, mirror = (figures(work / "defectnet-seed0" / sub / "predictions.csv") for sub in (".", "mirror"))
    row = first.iloc[0]
    assert (row["errors"], row["in_ps_errors"], row["review_share"]) == pytest.approx(
        (plain["errors"], plain["in_ps"], plain["review"]), abs=1e-6)
    assert (row["errors_mirror"], row["in_ps_errors_mirror"], row["review_share_mirror"]) == pytest.approx(
        (mirror["errors"], mirror["in_ps"], mirror["review"]), abs=1e-6)
    probs = [pd.read_csv(work / "defectnet-seed0" / sub / "predictions.csv")["confidence"] for sub in (".", "mirror")]
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # the second evaluation did average over the mirror

    again = bench(tiny_data, work, tmp_path / "again.csv", "--reuse")
    assert model.read_bytes() == trained  # not trained again
    columns = ["errors", "errors_mirror", "in_ps_errors", "in_ps_errors_mirror", "review_share", "review_share_mirror"]
    assert again[columns].equals(first[columns]) and again.loc[0, "train_s"] == first.loc[0, "train_s"]
