"""params.yaml → frozen dataclasses, dotted overrides and the data-source variable; a misspelt
key or a wrong type refused before any work, at every entry point."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.core.config import DATA_SOURCE_ENV, ConfigError, from_dict, load_config, load_raw
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError

from conftest import make_project, run_in_project


def test_params_file_loads_into_frozen_config():
    cfg = load_config()
    assert cfg.train.model in cfg.train.recipes
    assert cfg.train.recipe is cfg.train.recipes[cfg.train.model]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_dotted_overrides_are_typed_as_yaml():
    cfg = load_config(overrides=["train.model=seed_cnn", "train.recipes.seed_cnn.lr=0.01",
                                 "data.expected_per_class=any", "seed=7"])
    assert cfg.train.recipe.lr == 0.01 and cfg.train.recipe.loss == "mse"
    assert cfg.data.expected_per_class is None
    assert cfg.seed == 7


@pytest.mark.parametrize("override", ["train.modle=x", "nosuch.key=1", "seed"])
def test_bad_override_names_the_key(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(overrides=[override])


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match="train.model"):
        load_config(overrides=["train.model=resnet999"])


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_review_threshold_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="review.below_confidence"):
        load_config(overrides=[f"review.below_confidence={value}"])


@pytest.mark.parametrize("key,value", [("turn_probability", -0.2), ("roll_mark_share", 30)])
def test_augmentation_shares_outside_0_1_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"train.recipes.defectnet.{key}={value} must be a share"):
        load_config(overrides=[f"train.recipes.defectnet.{key}={value}"])


def test_environment_variable_overrides_data_source(monkeypatch):
    monkeypatch.setenv(DATA_SOURCE_ENV, "/plant/images")
    assert load_config().data.source == "/plant/images"


def test_resolved_config_round_trips():
    cfg = load_config(overrides=["train.model=seed_cnn"])
    assert from_dict(cfg.to_dict()) == cfg


def test_missing_params_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_raw(tmp_path / "params.yaml")


def test_arch_is_read_only_with_lists_as_tuples():
    cfg = load_config(overrides=["train.recipes.defectnet.arch.widths=[4, 8, 16]",
                                 "train.recipes.defectnet.arch.detrend=0"])
    arch = cfg.train.recipe.arch
    assert arch["widths"] == (4, 8, 16) and arch["detrend"] == 0 and arch["stem"] == "trimmed"
    with pytest.raises(TypeError):
        arch["detrend"] = 2  # type: ignore[index]
    assert cfg.to_dict()["train"]["recipes"]["defectnet"]["arch"]["widths"] == [4, 8, 16]
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("model,key", [("defectnet", "depth"), ("defectnet_res", "full_resolution"),
                                       ("seed_cnn", "dropout")])
@pytest.mark.slow
def test_unknown_arch_key_is_refused_by_the_train_stage_naming_the_allowed_ones(model, key, tiny_data, tmp_path):
    """The constructor's signature is the one list of architecture arguments: the train stage
    refuses a key it does not take, in one line, before any epoch."""
    from neu_model.training.train import train

    raw = load_raw()
    raw["train"]["model"] = model
    raw["train"]["recipes"][model]["arch"][key] = 1
    raw["data"]["expected_per_class"] = None
    cfg = from_dict(raw)  # loading leaves the check to the constructor
    allowed = "num_classes$" if model == "seed_cnn" else "num_classes, widths, dropout, stem"
    with pytest.raises(StageError, match=rf"train.recipes.{model}.arch: model '{model}' takes no argument {key}; "
                                         rf"its arguments are {allowed}"):
        train(cfg, tiny_data.split, tiny_data.images, tmp_path / "model.pt", tmp_path / "checkpoint.pt",
              tmp_path / "log.csv", tmp_path / "metrics.json", tiny_data.raw / "manifest.csv")


def test_arch_key_missing_from_params_cannot_be_set():
    with pytest.raises(ConfigError, match="no key 'train.recipes.seed_cnn.arch.widths'"):
        load_config(overrides=["train.recipes.seed_cnn.arch.widths=[8]"])


def test_recipe_without_arch_means_the_constructor_defaults():
    raw = load_raw()
    del raw["train"]["recipes"]["defectnet"]["arch"]
    assert dict(from_dict(raw).train.recipes["defectnet"].arch) == {}


# ---------------------------------------------------------------- refused before any work, at every entry

def test_unknown_key_in_params_names_it_and_the_keys_there():
    raw = load_raw()
    raw["train"]["recipes"]["defectnet"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"^params.yaml: unknown key train.recipes.defectnet.epochz; check the "
                                          r"spelling; keys under train.recipes.defectnet: epochs, batch_size, "):
        from_dict(raw)


@pytest.mark.parametrize("override,expected", [
    ("train.recipes.defectnet.epochs=abc", "train.recipes.defectnet.epochs='abc' must be an integer"),
    ("train.recipes.defectnet.lr=fast", "train.recipes.defectnet.lr='fast' must be a number"),
    ("train.recipes.defectnet.shuffle=1", "train.recipes.defectnet.shuffle=1 must be true or false"),
    ("seed=0.5", "seed=0.5 must be an integer"),
    ("data.expected_per_class=many", "data.expected_per_class='many' must be an integer or \"any\""),
    ("data.classes=Cr", "data.classes='Cr' must be a list"),
    ("train.device=[cpu]", "train.device=['cpu'] must be a string"),
    ("evaluate.robustness=yes please", "evaluate.robustness='yes please' must be true or false"),
])
def test_wrong_type_names_the_key_and_the_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value) == f"params.yaml: {expected}" or str(err.value).startswith(f"params.yaml: {expected} (")


@pytest.mark.parametrize("device", ["gpu", "no-such-device", "cuda:x"])
def test_unknown_device_is_refused_naming_the_choices(device):
    with pytest.raises(ConfigError, match=rf"train.device='{device}' is no device; use auto, cpu, cuda, cuda:N or mps"):
        load_config(overrides=[f"train.device={device}"])
    assert load_config(overrides=["train.device=cuda:1"]).train.device == "cuda:1"


def test_numbers_as_yaml_1_2_writes_them_are_taken():
    # `dvc exp run -S lr=1e-3` writes 1e-3, which PyYAML (YAML 1.1) reads as a string.
    assert load_config(overrides=["train.recipes.defectnet.lr=1e-3"]).train.recipe.lr == 0.001
    assert load_config(overrides=["register.accuracy_floor=1"]).register.accuracy_floor == 1


@pytest.mark.parametrize("override,named", [
    ("train.recipes.defectnet.epochz=1", "no key 'train.recipes.defectnet.epochz' in params.yaml; check the "
                                         "spelling; keys there: epochs, batch_size"),
    ("train.recipes.defectnet.epochs=abc", "train.recipes.defectnet.epochs='abc' must be an integer")])
@pytest.mark.slow
def test_a_stage_refuses_a_bad_override_before_any_work(tmp_path, override, named):
    result = subprocess.run([sys.executable, "-m", "neu_model.training.train", "--set", override], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and named in result.stderr
    assert list(tmp_path.iterdir()) == []  # no model, no checkpoint, no report


@pytest.mark.slow
def test_dvc_exp_run_with_a_bad_key_or_type_stops_before_training(tmp_path):
    project = make_project(tmp_path / "project")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "start"], cwd=project, check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    for value, named in [("train.recipes.defectnet.epochz=1", "Could not override 'train.recipes.defectnet.epochz'"),
                         ("+train.recipes.defectnet.epochz=1", "unknown key train.recipes.defectnet.epochz"),
                         ("train.recipes.defectnet.epochs=abc", "train.recipes.defectnet.epochs='abc' must be an "
                                                                "integer")]:
        result = run_in_project([dvc, "exp", "run", "-S", value], project)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and named in output, output
        assert "Running stage 'train'" not in output
        assert not list(project.glob("models/*.pt")) and not (project / "data" / "raw").exists()
        subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)  # DVC leaves -S values there
