"""Stage ``train``: train the model selected by ``train.model`` with its recipe.

Writes the last epoch's weights (the best-on-validation ones when ``split.val_fraction`` holds
out a validation part) to ``models/model.pt``, per-epoch curves to
``reports/train_log.csv`` and a summary to ``reports/train_metrics.json``. A checkpoint is
written atomically after every epoch; a killed run resumes from it and ends with the same
weights as an uninterrupted one. On several processes (``neu_model.training.distributed``) every rank
trains and rank 0 alone validates, writes and logs.

    python -m neu_model.training.train [--set train.model=seed_cnn] [--set train.device=cpu]
    torchrun --nproc-per-node=2 -m neu_model.training.train      # one process per GPU (docs/distributed-training.md)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from neu_model.core import paths, provenance
from neu_model.core.config import CLASSES, Config, Recipe, add_config_args, load_config
from neu_model.core.files import sha256_file, torch_save, write_csv, write_json
from neu_model.core.paths import (
    CHECKPOINT_FILE,
    IMAGE_DIR,
    MANIFEST,
    MODEL_FILE,
    SPLIT_FILE,
    TRAIN_CURVES,
    TRAIN_LOG,
    TRAIN_METRICS,
)
from neu_model.core.progress import progress
from neu_model.core.stage import StageError, run_stage
from neu_model.data.dataset import ImageSet, to_float
from neu_model.evaluation.figures import curves_figure
from neu_model.inference.torch_model import UNREADABLE, memory_format, predict_logits, select_device
from neu_model.inference.unknown import fit_for_weights
from neu_model.model.networks import build_model, count_macs, count_params
from neu_model.registry import tracking
from neu_model.training.augment import augment
from neu_model.training.distributed import Context, NoRun, prepare, rank_loss, rank_seed, session, shard, wrap
from neu_model.training.packed import fit_sets
from neu_model.training.recipe import epoch_order, loss_fn, make_optimizer, make_scheduler

log = logging.getLogger("neu_model.training.train")


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float


def make_ema(model: nn.Module, recipe: Recipe) -> AveragedModel | None:
    """An exponential moving average of the weights and batch-norm statistics, or None when off."""
    if recipe.ema_decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)


def train_one_epoch(model: nn.Module, data: ImageSet, recipe: Recipe, optimizer: torch.optim.Optimizer,
                    scheduler, device: torch.device, seed: int, epoch: int,
                    ema: AveragedModel | None = None, ctx: Context | None = None) -> EpochStats:
    """One pass over the training images (this rank's share of each batch under torchrun);
    randomness depends only on (seed, epoch, rank) so a resume is exact. Nothing waits for the
    device before the epoch's end: the losses and hits stay on it and are read once."""
    ctx = ctx or Context(device)
    model.train()
    torch.manual_seed(rank_seed(seed * 1000 + epoch, ctx.rank))  # dropout
    augment_seed = rank_seed(seed * 1000 + epoch + 7919, ctx.rank)
    gen = torch.Generator().manual_seed(augment_seed)  # augmentation's choices
    noise_gen = None if device.type == "cpu" else torch.Generator(device).manual_seed(augment_seed)
    order = epoch_order(len(data), recipe, seed, epoch).to(data.images.device)
    use_amp = device.type == "cuda"
    losses, hits, scales, start = [], [], [], time.perf_counter()
    batches = range(0, len(order), recipe.batch_size)
    for i in progress(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch") if ctx.is_main else batches:
        part = shard(order[i: i + recipe.batch_size], ctx)
        x = to_float(data.images[part.idx].to(device, non_blocking=True))
        x = augment(x, recipe.augment, gen, recipe.turn_probability, recipe.roll_mark_share, noise_gen)
        y = data.labels[part.idx].to(device, non_blocking=True)
        x = x.contiguous(memory_format=memory_format(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = rank_loss(loss_fn(logits, y, recipe, "sum"), part) if ctx.distributed else loss_fn(logits, y, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))  # the network inside DDP's wrapper
        losses.append(loss.detach())
        hits.append((logits.argmax(1) == y).sum() * part.real)
        scales.append(part.scale)
    total_loss = sum(v * s for v, s in zip(torch.stack(losses).tolist(), scales, strict=True))
    total_loss, correct = ctx.all_sum([total_loss, int(torch.stack(hits).sum())])
    return EpochStats(total_loss / len(data), correct / len(data), time.perf_counter() - start)


def validation_stats(model: nn.Module, data: ImageSet, recipe: Recipe, device: torch.device) -> EpochStats:
    """Loss and accuracy on held-out images."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, data.images, device), data.labels.cpu()
    loss = loss_fn(logits, labels, recipe).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return EpochStats(loss, acc, time.perf_counter() - start)


def run_key(cfg: Config, split_file: Path, model: nn.Module) -> str:
    """What a checkpoint must match to be resumed: the resolved config, the exact split and the
    network's layout (a checkpoint left by an older version of the model's code does not fit)."""
    layout = ";".join(f"{name}{tuple(t.shape)}" for name, t in model.state_dict().items())
    return (sha256_file(split_file) + ":" + hashlib.sha256(layout.encode()).hexdigest()[:16]
            + ":" + repr(sorted(cfg.to_dict().items())))


def read_checkpoint(path: Path, device: torch.device) -> dict | None:
    """The checkpoint at ``path``, or None when there is none or it cannot be read (with a note:
    training starts afresh and replaces it after the first epoch)."""
    if not Path(path).exists():
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - truncated, foreign or from another torch: all mean "not ours"
        log.warning("%s is %s: training starts afresh", path, UNREADABLE)
        return None
    if not isinstance(ckpt, dict):
        log.warning("%s is not a checkpoint of this stage: training starts afresh", path)
        return None
    return ckpt


def train(cfg: Config, split_file: Path = SPLIT_FILE, image_dir: Path | None = None,
          model_file: Path = MODEL_FILE, checkpoint_file: Path = CHECKPOINT_FILE,
          log_file: Path = TRAIN_LOG, metrics_file: Path = TRAIN_METRICS, manifest: Path = MANIFEST,
          ctx: Context | None = None) -> dict:
    """Train, checkpoint every epoch, keep the best-on-validation weights (with no validation
    part, ``split.val_fraction: 0``, the last epoch's). ``ctx``: this process's rank under
    torchrun (``distributed.session``); None: one process on ``train.device``.

    Returns:
        The training summary written to ``metrics_file``; an empty dict on the ranks other than 0.
    """
    recipe = cfg.train.recipe
    ctx = ctx or Context(select_device(cfg.train.device))
    if ctx.is_main:  # the other ranks never open the store
        tracking.connect()  # an MLflow store that does not answer fails here, not after training
    device = ctx.device
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    train_set, val_set = fit_sets(cfg, split_file, image_dir or IMAGE_DIR, manifest, ctx)
    if not len(train_set):
        raise StageError(f"{split_file}: no training images; run the split stage on a larger set")
    log.info("model %s on %s: %d train / %d val images, %d epochs", cfg.train.model, device,
             len(train_set), len(val_set), recipe.epochs)

    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.train.model, **recipe.arch)
    except (TypeError, ValueError) as exc:  # a value of the wrong type or out of range
        raise StageError(f"params.yaml: train.recipes.{cfg.train.model}.arch: {exc}") from None
    macs, params = count_macs(model, cfg.data.image_size), count_params(model)
    model = prepare(model, ctx, cfg.train.sync_batchnorm).to(device, memory_format=memory_format(device))
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, math.ceil(len(train_set) / recipe.batch_size))
    ema = make_ema(model, recipe)
    scored = ema.module if ema is not None else model  # what is validated and kept as the best
    key = run_key(cfg, split_file, model)
    state = {"epoch": 0, "history": [], "best": None, "best_score": None}
    ckpt = read_checkpoint(checkpoint_file, device)
    if ckpt is not None and ckpt.get("run_key") == key:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            state = ckpt["state"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise StageError(f"{checkpoint_file}: matches this run but cannot be resumed ({type(exc).__name__}); "
                             f"rerun with --fresh to start afresh") from None
        log.info("resuming from %s after epoch %d", checkpoint_file, state["epoch"])
    ctx.check_same(state["epoch"], "the epoch to resume after")
    net = wrap(model, ctx)

    # One MLflow run per training (rank 0's); it checked the store before any epoch and ends FAILED if one raises.
    dataset_version = provenance.dataset_version(manifest)
    git_sha = provenance.git_sha()  # once: it is a git subprocess, and the code cannot change mid-run
    mlflow_run = (tracking.train_run(cfg, key=key, device=device, split_file=split_file, manifest=manifest,
                                     resume=state["epoch"] > 0) if ctx.is_main else contextlib.nullcontext(NoRun()))
    with mlflow_run as run:
        run.log_history(state["history"])  # epochs of a resumed checkpoint
        for epoch in range(state["epoch"], recipe.epochs):
            tr = train_one_epoch(net, train_set, recipe, optimizer, scheduler, device, cfg.seed, epoch, ema, ctx)
            ctx.check_weights(model, f"the weights after epoch {epoch + 1}")
            if not ctx.is_main:
                continue
            va = (validation_stats(scored, val_set, recipe, device) if len(val_set)
                  else EpochStats(math.nan, math.nan, 0.0))
            row = {"epoch": epoch + 1, "train_loss": tr.loss, "train_accuracy": tr.accuracy, "val_loss": va.loss,
                   "val_accuracy": va.accuracy, "lr": scheduler.get_last_lr()[0], "seconds": tr.seconds}
            state["history"].append(row)
            score = (va.accuracy, -va.loss)
            # Without a validation part there is nothing to select on: the end of the schedule is the model.
            if not len(val_set) or state["best_score"] is None or score > tuple(state["best_score"]):
                state["best_score"] = list(score)
                weights = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
                state["best"] = {"epoch": epoch + 1, "state_dict": weights}
            state["epoch"] = epoch + 1
            log.info("epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.1fs (%.0f img/s)",
                     epoch + 1, recipe.epochs, tr.loss, tr.accuracy, va.loss, va.accuracy, tr.seconds,
                     len(train_set) / tr.seconds)
            torch_save({"run_key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "state": state, "config": cfg.to_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "git_sha": git_sha}, checkpoint_file)
            write_csv(pd.DataFrame(state["history"]), log_file)
            run.log_epoch(row)

        if not ctx.is_main:
            return {}
        history = state["history"]
        train_seconds = sum(r["seconds"] for r in history)
        best = state["best"]
        best_val = history[best["epoch"] - 1]["val_accuracy"]
        summary = {
            "model": cfg.train.model, "device": str(device), "epochs": recipe.epochs, "best_epoch": best["epoch"],
            "val_accuracy": None if math.isnan(best_val) else best_val, "train_seconds": round(train_seconds, 2),
            "seconds_per_epoch": round(train_seconds / len(history), 2),
            "train_images_per_second": round(len(train_set) * len(history) / train_seconds, 1),
            "params": params, "macs": macs, "processes": ctx.world_size,
        }
        # model_args: what build_model needs to rebuild this variant (lists: plain data to load).
        model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.arch.items()}
        unknown = fit_for_weights(cfg.train.model, model_args, best["state_dict"], train_set.images,
                                  train_set.labels, val_set.images, cfg.unknown)
        torch_save({"model_name": cfg.train.model, "model_args": model_args,
                    "state_dict": best["state_dict"], "classes": list(CLASSES), "unknown": unknown,
                    "config": cfg.to_dict(), "git_sha": git_sha, "git_dirty": provenance.git_dirty(),
                    "dataset_version": dataset_version,
                    "summary": summary}, model_file)
        write_csv(pd.DataFrame(history), log_file)
        curves_file = Path(log_file).with_name(TRAIN_CURVES.name)
        curves_figure(pd.DataFrame(history), curves_file)
        write_json(metrics_file, summary)
        run.finish(cfg, summary, model_file, [curves_file, log_file, metrics_file],
                   Path(log_file).with_name(paths.RUN_FILE.name), dataset_version)
        return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    with session(cfg.train.device) as ctx:
        if args.fresh and ctx.is_main:
            CHECKPOINT_FILE.unlink(missing_ok=True)
        ctx.barrier()  # no rank reads the checkpoint before it is gone
        summary = train(cfg, ctx=ctx)
    if summary:
        log.info("wrote %s: %s", MODEL_FILE, summary)


if __name__ == "__main__":
    sys.exit(run_stage(main))
