"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU).

What DDP training must match, and why:

- Always: the ranks share out each global batch of the single process (the same seeded epoch
  order, one contiguous slice per rank), so an epoch sees every training image exactly once,
  and the ranks' losses are weighted so that DDP's gradient average is the global batch's
  mean-loss gradient (checked without processes below).
- Without batch norm and dropout (seed_cnn, no augmentation) nothing else depends on how a
  batch is split, so 2 ranks take the same steps as one process: the weights agree to float
  rounding (the sums run in another order), 1e-5 of each tensor's norm. DefectNet has batch
  norm: with per-rank statistics (the default) a rank normalises its half batch by its own
  mean and spread, which changes the gradients, and each rank draws its own augmentation and
  dropout; its DDP run is checked for what still holds: all ranks in step every epoch (the
  train stage compares their weights and stops otherwise), one model, one MLflow run, the loss
  falling as it does on one process. PyTorch's SyncBatchNorm, the option that would make
  DefectNet match too, runs on GPUs only.
"""

import os
import shutil
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from neu_model.core.config import load_config
from neu_model.core.stage import StageError
from neu_model.model.networks import build_model
from neu_model.training.distributed import Context, prepare, rank_device, rank_loss, shard
from neu_model.training.recipe import epoch_order
from neu_model.training.train import train

from conftest import make_project, run_in_project, tiny_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _project(root: Path, tiny_data, *overrides: str) -> Path:
    """A project copy (fixture-sized params) holding the fixture's downloaded and split images."""
    make_project(root, *overrides)
    shutil.copytree(tiny_data.root / "data", root / "data")
    return root


def _single(tiny_data, out: Path, *overrides: str) -> dict:
    out.mkdir()
    return train(tiny_config(*overrides), tiny_data.split, tiny_data.images, out / "model.pt", out / "ckpt.pt",
                 out / "log.csv", out / "metrics.json", tiny_data.raw / "manifest.csv")


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize(("n", "batch_size", "ranks"), [(18, 8, 2), (18, 17, 2), (1134, 64, 3), (10, 4, 4)])
def test_the_ranks_shards_of_each_batch_make_up_the_epoch_order(n, batch_size, ranks):
    recipe = load_config().train.recipes["defectnet"]
    order = epoch_order(n, recipe, seed=0, epoch=3)
    for start in range(0, n, batch_size):
        batch = order[start: start + batch_size]
        parts = [shard(batch, Context(rank=r, world_size=ranks)) for r in range(ranks)]
        assert torch.equal(torch.cat([p.idx for p in parts if p.real]), batch)  # disjoint, in order, complete
        assert max(len(p.idx) for p in parts) - min(len(p.idx) for p in parts) <= 1
        assert sum(not p.real for p in parts) == max(0, ranks - len(batch))  # stand-ins only when needed
        assert all(len(p.idx) for p in parts)  # every rank computes, so none waits alone in the allreduce


@pytest.mark.parametrize(("batch_size", "ranks"), [(8, 2), (7, 2), (17, 3), (1, 2)])
@pytest.mark.slow
def test_the_average_of_the_rank_losses_is_the_batch_mean(batch_size, ranks):
    """DDP averages the ranks' gradients; the gradient of the average is the average gradient."""
    losses = torch.rand(batch_size, dtype=torch.float64)
    batch = torch.arange(batch_size)
    parts = [shard(batch, Context(rank=r, world_size=ranks)) for r in range(ranks)]
    average = sum(rank_loss(losses[p.idx].sum(), p) for p in parts) / ranks
    torch.testing.assert_close(average, losses.mean())


def test_sync_batchnorm_is_refused_on_cpu_ranks_and_unneeded_on_one_process():
    model = build_model("defectnet")
    with pytest.raises(StageError, match="sync_batchnorm=true needs CUDA"):
        prepare(model, Context(torch.device("cpu"), rank=0, world_size=2), sync_batchnorm=True)
    assert prepare(model, Context(), sync_batchnorm=True) is model


def test_a_rank_takes_the_gpu_of_its_local_rank_and_no_other():
    assert rank_device("cuda", 3) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(StageError, match="LOCAL_RANK"):
        rank_device("cuda:1", 0)


@pytest.mark.distributed
@pytest.mark.slow
def test_without_batch_norm_and_dropout_two_ranks_take_the_single_process_steps(tiny_data, tmp_path):
    # 18 training images in batches of 17: the ranks split 9/8, then the last image goes to rank 0
    # while rank 1 computes a zero-weighted stand-in; seed_cnn's recipe has no augmentation.
    overrides = ["train.model=seed_cnn", "train.recipes.seed_cnn.epochs=2", "train.recipes.seed_cnn.batch_size=17"]
    project = _project(tmp_path / "project", tiny_data, *overrides)
    result = run_in_project([*TORCHRUN, "-m", "neu_model.training.train"], project)
    assert result.returncode == 0, result.stderr[-3000:]
    single = _single(tiny_data, tmp_path / "single", *overrides)

    ddp_weights = torch.load(project / "models" / "model.pt", weights_only=True)["state_dict"]
    single_weights = torch.load(tmp_path / "single" / "model.pt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    initial = build_model("seed_cnn").state_dict()
    for name, expected in single_weights.items():
        assert not torch.equal(expected, initial[name])  # it trained
        assert (ddp_weights[name] - expected).norm() <= 1e-5 * expected.norm(), name
    ddp_log = pd.read_csv(project / "reports" / "train_log.csv")
    single_log = pd.read_csv(tmp_path / "single" / "log.csv")
    assert ddp_log["train_loss"].tolist() == pytest.approx(single_log["train_loss"].tolist(), rel=1e-5)
    assert ddp_log["train_accuracy"].tolist() == single_log["train_accuracy"].tolist()
    assert single["processes"] == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_train_one_model_in_one_mlflow_run_and_rank_1_writes_nothing(tiny_data, tmp_path):
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    overrides = ["train.recipes.defectnet.epochs=2", f"mlflow.experiment={experiment}"]
    project = _project(tmp_path / "project", tiny_data, *overrides)
    # Rank 1 runs in a folder of its own holding only the data, with a store that cannot be opened:
    # a file it wrote would show there, and opening the store would fail the run.
    other = tmp_path / "rank1"
    shutil.copytree(tiny_data.root / "data", other / "data")
    before = _files(other)
    script = ('if [ "$RANK" != 0 ]; then cd "$RANK1_DIR"; export MLFLOW_TRACKING_URI="sqlite:///$RANK1_DIR/none/x.db"; '
              'fi; exec python -m neu_model.training.train "$@"')
    result = run_in_project([*TORCHRUN, "--no-python", "bash", "-c", script, "train"], project,
                            RANK1_DIR=str(other), PYTHONDONTWRITEBYTECODE="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2 on cpu (gloo)" in result.stderr

    assert _files(other) == before
    assert (project / "models" / "model.pt").is_file() and (project / "reports" / "run.json").is_file()
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["processes"] == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")] == [1, 2]

    _single(tiny_data, tmp_path / "single", *overrides)
    ddp_log = pd.read_csv(project / "reports" / "train_log.csv")
    single_log = pd.read_csv(tmp_path / "single" / "log.csv")
    for log in (ddp_log, single_log):  # both learn: the second epoch's loss is below the first's
        assert log["train_loss"].iloc[1] < log["train_loss"].iloc[0]
