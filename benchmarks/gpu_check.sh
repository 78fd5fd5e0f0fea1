#!/usr/bin/env bash
# The GPU checks of the training code, as one script for a machine with a CUDA GPU.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to gpu_check/; the verdicts: OUT_DIR/summary.txt
#
#   1. pytest -m gpu: training on CUDA (images held on the GPU, and memory-mapped), augmentation on CUDA
#   2. the host synchronisations of 2 training epochs on CUDA, counted by source line
#      (torch.cuda.set_sync_debug_mode): the training step should cause none
#   3. the default training (params.yaml: defectnet, 60 epochs) and evaluation on CUDA, in a scratch
#      copy of the project, next to the CPU run committed in reports/: seconds, images/s, seconds
#      to the CPU run's best validation accuracy, test accuracy. Target: 60 epochs in 30 s or less
#      on one H200.
#   4. only with DDP_CPU_CHECK=1 (a few more minutes): the default training on 2 CPU processes
#      (torchrun, gloo, per-rank batch norm), to compare its accuracy with one process's on the real data
#
# Needs the real images: NEU_DATA_SOURCE, default ../shared/data/NEU-CLS (as in the README), and a
# Python with the project's packages: PYTHON, default .venv/bin/python. About 5 minutes on one H200.
# Writes nothing in the checkout but OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export NEU_DATA_SOURCE=${NEU_DATA_SOURCE:-../shared/data/NEU-CLS}
NEU_DATA_SOURCE=$(cd "$NEU_DATA_SOURCE" && pwd) || { echo "no images at NEU_DATA_SOURCE" >&2; exit 2; }
export MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 NEU_PROGRESS=0
OUT=${1:-gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
failed=0

echo "== 1. pytest -m gpu"
PYTHONPATH=$ROOT "$PYTHON" -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/pytest_gpu.txt" || failed=1

echo "== scratch project, data (source, download, split)"
WORK=$OUT/project
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r dvc.yaml params.yaml pyproject.toml neu_model "$WORK"/
cd "$WORK" && git init -q
export PYTHONPATH=$WORK MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db
for stage in source download split; do
    "$PYTHON" -m neu_model.$stage > "$OUT/$stage.log" 2>&1 || { echo "stage $stage failed: $OUT/$stage.log"; exit 1; }
done

echo "== 2. host synchronisations in 2 epochs of training on CUDA"
"$PYTHON" - > "$OUT/syncs.txt" 2>&1 <<'EOF' || failed=1
import collections, math, warnings
from pathlib import Path
import torch
import neu_model.training.train as T
from neu_model.core.config import load_config
from neu_model.data.dataset import SPLIT_FILE, read_split

real_epoch, seen = T.train_one_epoch, collections.Counter()
def counted_epoch(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return real_epoch(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            seen.update(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
T.train_one_epoch = counted_epoch
cfg = load_config(overrides=["train.device=cuda", "train.recipes.defectnet.epochs=2"])
out = Path("sync_run"); out.mkdir(exist_ok=True)
T.train(cfg, model_file=out / "model.pt", checkpoint_file=out / "ckpt.pt", log_file=out / "log.csv",
        metrics_file=out / "metrics.json")
steps = 2 * math.ceil(int((read_split(SPLIT_FILE)["split"] == "train").sum()) / cfg.train.recipe.batch_size)
print(f"{sum(seen.values())} synchronisations in {steps} steps (2 epochs); by source line:")
for where, count in seen.most_common():
    print(f"  {count:6d}  {where}")
EOF
cat "$OUT/syncs.txt"

echo "== 3. the default training (60 epochs) and evaluation on CUDA"
"$PYTHON" -m neu_model.training.train --set train.device=cuda > "$OUT/train.log" 2>&1 || { failed=1; tail -5 "$OUT/train.log"; }
"$PYTHON" -m neu_model.evaluation.evaluate --set train.device=cuda > "$OUT/evaluate.log" 2>&1 || { failed=1; tail -5 "$OUT/evaluate.log"; }
cp -r reports "$OUT/reports" 2>/dev/null
"$PYTHON" - "$ROOT/reports" "$WORK/reports" "$(cat "$OUT/gpu.txt")" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
import pandas as pd

def figures(reports: Path) -> dict:
    train = json.loads((reports / "train_metrics.json").read_text())
    log = pd.read_csv(reports / "train_log.csv")
    test = json.loads((reports / "metrics.json").read_text())["accuracy"] if (reports / "metrics.json").exists() else None
    return {"train": train, "log": log, "test": test}

cpu, gpu = figures(Path(sys.argv[1])), figures(Path(sys.argv[2]))
target = cpu["train"]["val_accuracy"]
def to_target(log):
    reached = log.index[log["val_accuracy"] >= target - 1e-9]
    return round(float(log["seconds"].iloc[: reached[0] + 1].sum()), 1) if len(reached) else None
def cell(value) -> str:
    return f"{value:>16.4g}" if isinstance(value, float) else f"{value!s:>16}"

print(f"GPU: {sys.argv[3]}")
print(f"{'':28s}{'CPU (reports/)':>16s}{'CUDA':>16s}")
rows = [("device", "device"), ("train seconds (60 epochs)", "train_seconds"),
        ("train images/s", "train_images_per_second"), ("best val accuracy", "val_accuracy")]
for name, key in rows:
    print(f"{name:28s}{cell(cpu['train'][key])}{cell(gpu['train'][key])}")
print(f"{f'seconds to val acc {target}':28s}{cell(to_target(cpu['log']))}{cell(to_target(gpu['log']))}")
print(f"{'test accuracy':28s}{cell(cpu['test'])}{cell(gpu['test'])}")
seconds = gpu["train"]["train_seconds"]
print(f"target 60 epochs <= 30 s: {'met' if seconds <= 30 else 'NOT met'} ({seconds} s)")
EOF

if [ "${DDP_CPU_CHECK:-0}" = 1 ]; then
    echo "== 4. the default training on 2 CPU processes (torchrun, gloo)"
    threads=$(( $(nproc) / 2 ))
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=2 -m neu_model.training.train --set train.device=cpu \
        --set train.num_threads=$threads > "$OUT/train_ddp_cpu.log" 2>&1 || { failed=1; tail -5 "$OUT/train_ddp_cpu.log"; }
    "$PYTHON" -m neu_model.evaluation.evaluate --set train.device=cpu > "$OUT/evaluate_ddp_cpu.log" 2>&1 || failed=1
    echo "2 CPU processes: $(cat reports/train_metrics.json | tr -d '\n ')" | tee -a "$OUT/summary.txt"
    echo "  test accuracy: $("$PYTHON" -c 'import json; print(json.load(open("reports/metrics.json"))["accuracy"])')" \
        | tee -a "$OUT/summary.txt"
    cp -r reports "$OUT/reports_ddp_cpu"
fi
exit $failed
