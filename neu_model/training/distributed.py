"""Training on several processes: ``torchrun`` starts them, PyTorch's DistributedDataParallel keeps
their weights identical (gloo on the CPU, NCCL on CUDA).

    torchrun --nproc-per-node=2 -m neu_model.training.train

Each process is one rank (docs/distributed-training.md has the reasons):

- data: every rank computes the same seeded epoch order; each global batch of ``batch_size``
  images (the batch the recipe's learning rate is for) is cut into one contiguous slice per rank,
  so step k of all ranks together sees exactly the batch k of a single process;
- loss: each rank's sum of per-image losses divided by the global batch size over the number of
  ranks, so that DDP's average of the ranks' gradients is the gradient of the global batch's mean
  loss, even when the last batch does not split evenly;
- outputs: only rank 0 validates, writes the checkpoint, model and reports, and opens the MLflow
  store; the other ranks train and write nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from neu_model.core.stage import StageError
from neu_model.inference.torch_model import select_device

log = logging.getLogger("neu_model.training.distributed")

RANK_SEED_STRIDE = 1 << 32  # rank r's random streams start r * 2**32 after rank 0's: never a single run's


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank 0 of 1 when not started by ``torchrun``."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The sums over the ranks of ``values`` (one collective); ``values`` itself on one process."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def check_same(self, value: float, what: str) -> None:
        """Raise when the ranks disagree on ``value``: a rank that went its own way is never silent."""
        if not self.distributed:
            return
        mine = torch.tensor([value], dtype=torch.float64, device=self.device)
        seen = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(seen, mine)
        values = [v.item() for v in seen]
        if len(set(values)) > 1:
            raise StageError(f"the {self.world_size} training processes disagree on {what}: {values}; "
                             "every rank must read the same data, params and checkpoint (a shared folder)")

    def check_weights(self, model: nn.Module, what: str) -> None:
        """Raise unless every rank holds the same weights (compared by their float64 sum), as DDP
        promises: the allreduce hands every rank the same bits, so any difference is a fault."""
        if self.distributed:
            self.check_same(float(torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()), what)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams; rank 0 keeps ``seed``, so one process is unchanged."""
    return seed + rank * RANK_SEED_STRIDE


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of a torchrun rank: the GPU numbered ``LOCAL_RANK`` on CUDA, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise StageError(f"train.device={name!r} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                     "set train.device to auto, cuda or cpu")


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Context]:
    """This process's context: one process, or one rank of a ``torchrun`` launch (``WORLD_SIZE`` > 1),
    whose process group lives for the block."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Context(select_device(device_name))
        return
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = rank_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d on %s (%s)", rank, world, device, dist.get_backend())
    try:
        yield Context(device, rank, local_rank, world)
    finally:
        dist.destroy_process_group()


def prepare(model: nn.Module, ctx: Context, sync_batchnorm: bool) -> nn.Module:
    """The model with ``SyncBatchNorm`` in place of its batch norms when asked and useful.

    Raises:
        StageError: ``sync_batchnorm`` on CPU processes: PyTorch's SyncBatchNorm runs on GPUs only.
    """
    if not sync_batchnorm or not ctx.distributed:
        return model  # one process: the batch statistics are the global batch's already
    if ctx.device.type != "cuda":
        raise StageError("train.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm refuses CPU tensors); "
                         "set train.sync_batchnorm=false or train on GPUs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """What the training steps call: ``model`` in DistributedDataParallel (gradients averaged over
    the ranks in the backward pass), or ``model`` itself on one process."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


@dataclass(frozen=True)
class Shard:
    """This rank's part of one global batch.

    Attributes:
        idx: indices into the training set.
        scale: this rank's loss times ``scale`` is its sum of per-image losses.
        real: False for a stand-in: more ranks than images were left, and this rank computes a
            zero-weighted copy of one image so that it still takes part in the gradient average.
    """

    idx: torch.Tensor
    scale: float
    real: bool = True


def shard(batch: torch.Tensor, ctx: Context) -> Shard:
    """Rank ``ctx.rank``'s contiguous slice of the global ``batch`` (sizes differ by at most one)."""
    if not ctx.distributed:
        return Shard(batch, float(len(batch)))
    part = batch.tensor_split(ctx.world_size)[ctx.rank]
    scale = len(batch) / ctx.world_size
    return Shard(part, scale) if len(part) else Shard(batch[:1], scale, real=False)


def rank_loss(loss_sum: torch.Tensor, part: Shard) -> torch.Tensor:
    """What a rank backpropagates, from the sum of its images' losses: that sum over ``part.scale``
    (the global batch size over the ranks), so that DDP's average of the ranks' gradients is the
    gradient of the global batch's mean loss; zero for a stand-in."""
    return loss_sum * (float(part.real) / part.scale)


class NoRun:
    """What ranks other than 0 hold in place of the MLflow run: they log nothing."""

    def log_history(self, history: list[dict]) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        pass
