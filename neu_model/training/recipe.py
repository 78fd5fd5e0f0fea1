"""What a recipe (``train.recipes.<model>``) makes for the training loop: optimizer, learning-rate
schedule, loss and each epoch's sample order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neu_model.core.config import Recipe
from neu_model.core.stage import StageError


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam or AdamW; weight decay skips biases and norm weights, as is usual."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if recipe.optimizer not in optimizers:
        raise StageError(f"params.yaml: optimizer {recipe.optimizer!r} unknown; use one of {sorted(optimizers)}")
    return optimizers[recipe.optimizer](groups, lr=recipe.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate per step (the scheduler steps once per batch): constant, or (``onecycle``)
    ``(step + 1) / warmup`` times the lr over the first ``warmup_epochs``, then a cosine from
    the full lr to 0 over the remaining steps."""
    schedulers = torch.optim.lr_scheduler
    if recipe.schedule == "constant":
        return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if recipe.schedule != "onecycle":
        raise StageError(f"params.yaml: schedule {recipe.schedule!r} unknown; use constant or onecycle")
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = recipe.warmup_epochs * steps_per_epoch
    if warmup == 0:
        return schedulers.CosineAnnealingLR(optimizer, T_max=total)
    # LinearLR is at start_factor on step 0 and at 1 on step total_iters: (step + 1) / warmup.
    ramp = schedulers.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    return schedulers.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def loss_fn(logits: torch.Tensor, target: torch.Tensor, recipe: Recipe, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy, or the baseline's MSE between softmax output and one-hot targets (an image's
    loss: the mean over the classes); the mean or (``reduction="sum"``) the sum over the images."""
    if recipe.loss == "mse":
        one_hot = F.one_hot(target, logits.shape[1]).float()
        loss = F.mse_loss(logits.float().softmax(dim=1), one_hot, reduction=reduction)
        return loss if reduction == "mean" else loss / logits.shape[1]
    return F.cross_entropy(logits.float(), target, label_smoothing=recipe.label_smoothing, reduction=reduction)


def epoch_order(n: int, recipe: Recipe, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch; without shuffling, one seeded order kept for every epoch."""
    gen = torch.Generator().manual_seed(seed * 1000 + (epoch if recipe.shuffle else 0))
    return torch.randperm(n, generator=gen)
