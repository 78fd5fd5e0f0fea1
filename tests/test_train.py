"""Training: outputs, determinism, exact resume after a kill."""

import json

import pandas as pd
import pytest
import torch

from neu_model.core.stage import StageError
from neu_model.data.dataset import load_images, to_float
from neu_model.inference.torch_model import load_torch_model
from neu_model.model.networks import build_model
from neu_model.training.packed import pack_dir
from neu_model.training.train import train

from conftest import die_in_epoch, tiny_config


def _train(ws, out, cfg, split=None):
    return train(cfg, split or ws.split, ws.images, out / "model.pt", out / "ckpt.pt", out / "log.csv",
                 out / "metrics.json", ws.raw / "manifest.csv")


def test_outputs_are_loadable_and_complete(tiny_model):
    saved = torch.load(tiny_model, weights_only=True)
    assert saved["model_name"] == "defectnet"
    assert saved["model_args"] == saved["config"]["train"]["recipes"]["defectnet"]["arch"]
    assert saved["model_args"]["widths"] == [8, 16, 32, 64, 128, 256]  # lists, as plain data
    build_model(saved["model_name"], **saved["model_args"]).load_state_dict(saved["state_dict"])
    assert saved["classes"] == ["Cr", "In", "Pa", "PS", "RS", "Sc"]
    assert saved["config"]["train"]["model"] == "defectnet"
    assert len(saved["git_sha"]) in (40, 7) or saved["git_sha"] == "unknown"
    log = pd.read_csv(tiny_model.with_name("train_log.csv"))
    assert list(log["epoch"]) == [1]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(log.columns)
    summary = json.loads(tiny_model.with_name("train_metrics.json").read_text())
    assert summary["train_images_per_second"] > 0 and summary["macs"] > 0


@pytest.mark.slow
def test_same_seed_same_weights(tiny_data, tmp_path):
    cfg = tiny_config("train.model=seed_cnn")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _train(tiny_data, tmp_path / "a", cfg)
    _train(tiny_data, tmp_path / "b", cfg)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_killed_run_resumes_to_identical_weights(tiny_data, tmp_path, monkeypatch, ema_decay):
    cfg = tiny_config("train.recipes.defectnet.epochs=3", f"train.recipes.defectnet.ema_decay={ema_decay}")
    (tmp_path / "full").mkdir(), (tmp_path / "killed").mkdir()
    _train(tiny_data, tmp_path / "full", cfg)

    undo = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_data, tmp_path / "killed", cfg)
    assert not (tmp_path / "killed" / "model.pt").exists()
    undo()
    _train(tiny_data, tmp_path / "killed", cfg)

    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = pd.read_csv(tmp_path / "killed" / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_ema_weights_are_the_ones_validated_and_kept(tiny_data, tmp_path):
    (tmp_path / "raw").mkdir(), (tmp_path / "ema").mkdir()
    _train(tiny_data, tmp_path / "raw", tiny_config())
    _train(tiny_data, tmp_path / "ema", tiny_config("train.recipes.defectnet.ema_decay=0.5"))
    raw = torch.load(tmp_path / "raw" / "model.pt", weights_only=True)["state_dict"]
    ema = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)["state_dict"]
    assert raw.keys() == ema.keys()  # the averaged model saves like the plain one
    ckpt = torch.load(tmp_path / "ema" / "ckpt.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(ema[k], averaged[k]) for k in ema)  # one epoch: the best is the last average
    # the training weights moved on from their average, and so from what was kept
    assert any(not torch.equal(ema[k], ckpt["model"][k]) for k in ema if ema[k].is_floating_point())


@pytest.mark.slow
def test_without_a_validation_part_the_last_epoch_is_kept(tiny_data, tmp_path):
    split = pd.read_csv(tiny_data.split)
    split["split"] = split["split"].replace("val", "train")  # what split.val_fraction=0 writes
    split.to_csv(tmp_path / "split.csv", index=False)
    cfg = tiny_config("split.val_fraction=0", "train.recipes.defectnet.epochs=2",
                      "train.recipes.defectnet.ema_decay=0.5")
    summary = _train(tiny_data, tmp_path, cfg, split=tmp_path / "split.csv")
    assert summary["best_epoch"] == 2 and summary["val_accuracy"] is None
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["val_loss"].isna().all() and log["train_loss"].notna().all()
    kept = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    final = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(kept[k], final[k]) for k in kept)


@pytest.mark.slow
def test_with_a_validation_part_the_best_epoch_on_it_is_kept(tiny_data, tmp_path):
    split = pd.read_csv(tiny_data.split)
    first_train = split[split["split"] == "train"].groupby("label").head(1).index
    split.loc[first_train, "split"] = "val"  # one image a class
    split.to_csv(tmp_path / "split.csv", index=False)
    cfg = tiny_config("train.recipes.defectnet.epochs=3")
    summary = _train(tiny_data, tmp_path, cfg, split=tmp_path / "split.csv")
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["val_loss"].notna().all()
    best = max(log.itertuples(), key=lambda r: (r.val_accuracy, -r.val_loss))
    assert summary["best_epoch"] == best.epoch and summary["val_accuracy"] == best.val_accuracy


@pytest.mark.slow
def test_changed_config_does_not_resume(tiny_data, tmp_path):
    _train(tiny_data, tmp_path, tiny_config())
    summary = _train(tiny_data, tmp_path, tiny_config("train.recipes.defectnet.lr=0.0001"))
    assert summary["epochs"] == 1
    assert list(pd.read_csv(tmp_path / "log.csv")["epoch"]) == [1]


@pytest.mark.slow
def test_checkpoint_of_another_model_layout_does_not_resume(tiny_data, tmp_path, monkeypatch):
    from neu_model.model import networks as model

    monkeypatch.setitem(model.MODELS, "defectnet", lambda **kwargs: model.DefectNet(**kwargs | {"detrend": 0}))
    _train(tiny_data, tmp_path, tiny_config())  # leaves a checkpoint of the layout without Detrend
    monkeypatch.undo()
    _train(tiny_data, tmp_path, tiny_config())  # same config, the current layout: starts afresh
    assert list(pd.read_csv(tmp_path / "log.csv")["epoch"]) == [1]
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    model.build_model("defectnet").load_state_dict(saved["state_dict"])


@pytest.mark.slow
def test_arch_override_trains_and_saves_that_variant(tiny_data, tmp_path):
    cfg = tiny_config("train.recipes.defectnet.arch.widths=[4, 8, 16]", "train.recipes.defectnet.arch.detrend=0")
    summary = _train(tiny_data, tmp_path, cfg)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["model_args"]["widths"] == [4, 8, 16] and saved["model_args"]["detrend"] == 0
    variant = build_model("defectnet", **saved["model_args"])
    variant.load_state_dict(saved["state_dict"])
    assert not any(type(m).__name__ == "Detrend" for m in variant.modules())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("defectnet").load_state_dict(saved["state_dict"])
    assert summary["params"] < 5000  # three small stages, not the default's 395 k


def test_bad_arch_value_stops_before_training(tiny_data, tmp_path):
    with pytest.raises(StageError, match=r"train.recipes.defectnet.arch: stem 'median': choose one of"):
        _train(tiny_data, tmp_path, tiny_config("train.recipes.defectnet.arch.stem=median"))
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "model.pt").exists()


@pytest.mark.slow
def test_images_memory_mapped_beyond_the_budget_train_to_the_same_weights(tiny_data, tmp_path):
    (tmp_path / "memory").mkdir(), (tmp_path / "mapped").mkdir()
    _train(tiny_data, tmp_path / "memory", tiny_config())
    for stale in pack_dir(tiny_data.split).glob("*.npy"):
        stale.unlink()  # the budget-0 run below must build its pack, not find one
    _train(tiny_data, tmp_path / "mapped", tiny_config("train.memory_budget_mb=0"))
    assert list(pack_dir(tiny_data.split).glob("train-*.npy"))  # it went through the pack
    memory = torch.load(tmp_path / "memory" / "model.pt", weights_only=True)["state_dict"]
    mapped = torch.load(tmp_path / "mapped" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(memory[k], mapped[k]) for k in memory)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget_mb", [2048, 0])  # images on the GPU, or mapped on the host
def test_trains_on_cuda_with_mixed_precision(tiny_data, tmp_path, budget_mb):
    summary = _train(tiny_data, tmp_path, tiny_config("train.device=cuda", f"train.memory_budget_mb={budget_mb}"))
    assert summary["device"].startswith("cuda")
    model, _ = load_torch_model(tmp_path / "model.pt", "cuda")
    images = to_float(load_images(sorted(tiny_data.images.glob("*.bmp")))).cuda()
    with torch.no_grad():
        probs = model(images).softmax(1)
    assert probs.shape == (len(images), 6) and torch.isfinite(probs).all()
