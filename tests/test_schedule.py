"""The learning-rate schedule: torch's schedulers give the closed-form warm-up + cosine, and resume."""

import io
import math

import pytest
import torch

from neu_model.core.config import load_config
from neu_model.core.stage import StageError
from neu_model.training.recipe import make_scheduler

LR = 0.004


def closed_form(step: int, epochs: int, warmup_epochs: int, steps_per_epoch: int) -> float:
    """Linear warm-up to 1 over ``warmup_epochs``, then half a cosine to 0 over the rest."""
    total = max(1, epochs * steps_per_epoch)
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scheduler_for(epochs: int, warmup_epochs: int, steps_per_epoch: int, schedule: str = "onecycle"):
    recipe = load_config(overrides=[f"train.recipes.defectnet.epochs={epochs}",
                                    f"train.recipes.defectnet.warmup_epochs={warmup_epochs}",
                                    f"train.recipes.defectnet.schedule={schedule}",
                                    f"train.recipes.defectnet.lr={LR}"]).train.recipe
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=recipe.lr)
    return optimizer, make_scheduler(optimizer, recipe, steps_per_epoch)


def learning_rates(optimizer, scheduler, steps: int) -> list[float]:
    """The lr each batch trains with, as the training loop steps: optimizer, then scheduler."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs + [scheduler.get_last_lr()[0]]  # what the log records after the last batch


# (epochs, warmup_epochs, steps_per_epoch): the defectnet recipe on 1,134 training images at batch
# 64 (18 steps), and the edges: no warm-up, warm-up as long as training, longer than training.
CASES = [(60, 2, 18), (40, 2, 18), (60, 0, 18), (3, 3, 5), (2, 3, 4), (1, 1, 1), (1, 0, 1), (5, 1, 1)]


@pytest.mark.parametrize("epochs,warmup_epochs,steps_per_epoch", CASES)
def test_schedule_equals_the_closed_form_at_every_step(epochs, warmup_epochs, steps_per_epoch):
    optimizer, scheduler = scheduler_for(epochs, warmup_epochs, steps_per_epoch)
    total = epochs * steps_per_epoch
    lrs = learning_rates(optimizer, scheduler, total)
    expected = [LR * closed_form(s, epochs, warmup_epochs, steps_per_epoch) for s in range(total + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-18)
    if warmup_epochs < epochs:  # the full lr right after the warm-up, 0 after the last batch
        assert lrs[warmup_epochs * steps_per_epoch] == pytest.approx(LR, rel=1e-12) and lrs[-1] == 0.0


def test_constant_schedule_keeps_the_lr():
    optimizer, scheduler = scheduler_for(5, 2, 3, schedule="constant")
    assert learning_rates(optimizer, scheduler, 15) == [LR] * 16


def test_unknown_schedule_is_refused():
    with pytest.raises(StageError, match="schedule 'cyclic' unknown"):
        scheduler_for(5, 2, 3, schedule="cyclic")


def _saved(obj) -> dict:
    """``obj`` through torch.save / torch.load(weights_only=True), as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stop", [1, 17, 36, 37, 500])  # in the warm-up, at its end, after it
def test_saved_scheduler_state_resumes_identically(stop):
    total = 60 * 18
    optimizer, scheduler = scheduler_for(60, 2, 18)
    uninterrupted = learning_rates(optimizer, scheduler, total)

    optimizer, scheduler = scheduler_for(60, 2, 18)
    first = learning_rates(optimizer, scheduler, stop)
    saved = _saved({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    optimizer, scheduler = scheduler_for(60, 2, 18)  # a fresh process: optimizer first, as train does
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    resumed = learning_rates(optimizer, scheduler, total - stop)
    assert first[:-1] + resumed == uninterrupted
