"""Train and score every registered model over seeds; print one Markdown table.

    python benchmarks/bench_models.py                          # all models, seed 0, their recipes
    python benchmarks/bench_models.py --models defectnet --seeds 0 1 2
    python benchmarks/bench_models.py --models seed_cnn --epochs 3   # speed columns only
    python benchmarks/bench_models.py --models defectnet --seeds 3 4 --set split.val_fraction=0.1
    python benchmarks/bench_models.py --models defectnet --seeds 0 1 2 3 4 5 6 7 8 9 --mirror-eval \
        --workdir bench-mirror --reuse   # test-time mirror averaging, each model scored both ways

Each (model, seed) gets its own split of the downloaded set (``split.*`` of params.yaml, seeded
like the pipeline), is trained with its recipe from params.yaml (``--set`` overrides any key,
``--epochs`` every recipe's epochs) and evaluated with the evaluate stage, robustness suite
included. With ``--mirror-eval`` each model is evaluated a second time with mirror averaging
(``inference.mirror=true``; the first evaluation then without it, whatever params.yaml says), and
the table gains ``errors_mirror``, ``in_ps_errors`` / ``in_ps_errors_mirror`` and ``review_share``
/ ``review_share_mirror`` (the share of test images below ``review.below_confidence``); with
``--reuse`` models already trained in ``--workdir`` are only evaluated again.
Everything is written under ``--workdir`` (a temporary folder by default): nothing in
``data/``, ``models/`` or ``reports/`` is touched, and MLflow logs to a store in the work
folder unless ``MLFLOW_TRACKING_URI`` is set. Not part of the test suite: it takes minutes
per model and seed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neu_model.core.config import add_config_args, load_config  # noqa: E402
from neu_model.core.store import default_tracking_uri  # noqa: E402
from neu_model.inference.torch_model import fuse_batchnorm, memory_format  # noqa: E402
from neu_model.model.networks import MODELS, build_model, count_macs, count_params  # noqa: E402


def inference_speed(name: str, batch_size: int, arch: dict, repeats: int = 7, size: int = 200) -> float:
    """Median images/s of a freshly built model in eval mode (weights do not change the cost)."""
    torch.manual_seed(0)
    # as inference.load_torch_model + predict_logits run it: batch norms folded, channels-last
    cpu = torch.device("cpu")
    model = fuse_batchnorm(build_model(name, **arch).eval()).to(memory_format=memory_format(cpu))
    x = torch.rand(batch_size, 1, size, size).contiguous(memory_format=memory_format(cpu))
    times = []
    with torch.no_grad():
        for _ in range(2):
            model(x)
        for _ in range(repeats if batch_size > 1 else 5 * repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    times.sort()
    return batch_size / times[len(times) // 2]


def trained_before(model_file: Path, cfg) -> dict | None:
    """The summary of ``model_file`` when it was trained with exactly ``cfg`` (``--reuse``), else None."""
    if not model_file.is_file():
        return None
    saved = torch.load(model_file, map_location="cpu", weights_only=True)
    # Only what training reads: evaluation and inference settings may differ between reuses.
    # data.boxes only scores localisation: a model trained before it existed is the same model.
    def training_part(config: dict) -> dict:
        return {k: ({n: v for n, v in config.get(k, {}).items() if n != "boxes"} if k == "data" else config.get(k))
                for k in ("seed", "data", "split", "train")}

    same = training_part(saved.get("config", {})) == training_part(cfg.to_dict())
    return saved.get("summary") if same else None


def run_one(name: str, seed: int, epochs: int | None, work: Path, image_dir: Path, manifest: Path,
            params: Path, threads: int, robustness: bool = True, extra: list[str] | None = None,
            reuse: bool = False, mirror_eval: bool = False) -> dict:
    from neu_model.data.split import split_frame
    from neu_model.evaluation.evaluate import evaluate
    from neu_model.training.train import train

    overrides = [f"train.model={name}", f"seed={seed}", "train.device=cpu", f"train.num_threads={threads}",
                 f"evaluate.robustness={str(robustness).lower()}"]
    if epochs:
        overrides.append(f"train.recipes.{name}.epochs={epochs}")
    # --mirror-eval: the first evaluation without mirror averaging, whatever params.yaml says
    cfg = load_config(params, [*overrides, *(extra or []), *(["inference.mirror=false"] if mirror_eval else [])])
    out = work / f"{name}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    split_file = work / f"split-seed{seed}.csv"
    # Always rewritten: a work folder reused with other split.* overrides must not keep the old split.
    split_frame(pd.read_csv(manifest, dtype=str), cfg.split, seed).to_csv(split_file, index=False)
    summary = trained_before(out / "model.pt", cfg) if reuse else None
    if summary is None:
        (out / "checkpoint.pt").unlink(missing_ok=True)
        summary = train(cfg, split_file, image_dir, out / "model.pt", out / "checkpoint.pt", out / "train_log.csv",
                        out / "train_metrics.json", manifest)
    metrics = evaluate(cfg, out / "model.pt", split_file, image_dir, out)
    arch = dict(cfg.train.recipes[name].arch)
    model = build_model(name, **arch)
    row = {
        "model": name, "seed": seed, "epochs": summary["epochs"],
        "test_acc_%": round(100 * metrics["accuracy"], 2), "macro_f1_%": round(100 * metrics["macro_f1"], 2),
        "robust_%": round(100 * metrics.get("robustness", {}).get("mean_accuracy", float("nan")), 2),
        "in_ps_err": metrics["in_ps_errors"], "errors": metrics["errors"],
        # review.below_confidence: share of test images flagged for a person, errors not flagged
        "review_%": round(100 * metrics["review"]["flagged_share"], 2),
        "accepted_err": metrics["review"]["accepted_errors"],
        "train_s": round(summary["train_seconds"]), "train_img/s": summary["train_images_per_second"],
        "infer_img/s_b1": round(inference_speed(name, 1, arch)),
        "infer_img/s_b64": round(inference_speed(name, 64, arch)),
        "MMACs": round(count_macs(model) / 1e6, 1), "params_k": round(count_params(model) / 1e3),
    }
    if mirror_eval:
        mirror_cfg = load_config(params, [*overrides, *(extra or []), "inference.mirror=true"])
        # Scored apart from the training's MLflow run (no run.json there): the figures go into the
        # table only, and the tracking module's note that nothing is logged is expected here.
        tracking_log = logging.getLogger("neu_model.registry.tracking")
        level = tracking_log.level
        tracking_log.setLevel(logging.ERROR)
        try:
            mirrored = evaluate(mirror_cfg, out / "model.pt", split_file, image_dir, out / "mirror")
        finally:
            tracking_log.setLevel(level)
        row |= mirror_columns(metrics, mirrored)
    return row


def mirror_columns(plain: dict, mirror: dict) -> dict:
    """The test figures of one model with and without mirror averaging (``--mirror-eval``)."""
    columns = {"errors_mirror": mirror["errors"], "in_ps_errors": plain["in_ps_errors"],
               "in_ps_errors_mirror": mirror["in_ps_errors"], "review_share": plain["review"]["flagged_share"],
               "review_share_mirror": mirror["review"]["flagged_share"]}
    if "robustness" in mirror:
        columns["robust_%_mirror"] = round(100 * mirror["robustness"]["mean_accuracy"], 2)
    return columns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override every model's recipe epochs")
    add_config_args(parser)  # --params, --set KEY=VALUE
    parser.add_argument("--images", type=Path, default=ROOT / "data/raw/NEU-CLS")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data/raw/manifest.csv")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--no-robustness", action="store_true", help="skip the corruption suite (faster)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV here")
    parser.add_argument("--mirror-eval", action="store_true",
                        help="also evaluate each model with test-time mirror averaging (inference.mirror=true)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a model in --workdir trained with exactly the same config instead of retraining")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("NEU_PROGRESS", "0")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(work))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for seed in args.seeds:
            print(f"# {name} seed {seed} ...", file=sys.stderr, flush=True)
            rows.append(run_one(name, seed, args.epochs, work, args.images, args.manifest, Path(args.params),
                                args.threads, not args.no_robustness, args.overrides, args.reuse, args.mirror_eval))
    table = pd.DataFrame(rows)
    if len(args.seeds) > 1:
        means = table.groupby("model", sort=False).mean(numeric_only=True).round(2).reset_index()
        means["seed"] = "mean"
        table = pd.concat([table, means[table.columns]], ignore_index=True)
    print(f"\n{torch.get_num_threads()} CPU threads, torch {torch.__version__}, work folder {work}"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else "") + "\n")
    print(table.to_markdown(index=False))
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
