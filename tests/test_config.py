"""params.yaml → frozen dataclasses, dotted overrides and the data-source variable."""

import dataclasses

import pytest

from neu_model.config import (
    DATA_SOURCE_ENV,
    ConfigError,
    from_dict,
    load_config,
    load_raw,
)


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
def test_unknown_arch_key_is_refused_naming_the_allowed_ones(model, key):
    raw = load_raw()
    raw["train"]["recipes"][model]["arch"][key] = 1
    allowed = "none" if model == "seed_cnn" else "widths, dropout, stem"
    with pytest.raises(ConfigError, match=rf"train.recipes.{model}.arch.{key}: {model} takes no argument "
                                          rf"'{key}'; allowed: {allowed}"):
        from_dict(raw)


def test_arch_key_missing_from_params_cannot_be_set():
    with pytest.raises(ConfigError, match="no key 'train.recipes.seed_cnn.arch.widths'"):
        load_config(overrides=["train.recipes.seed_cnn.arch.widths=[8]"])


def test_recipe_without_arch_means_the_constructor_defaults():
    raw = load_raw()
    del raw["train"]["recipes"]["defectnet"]["arch"]
    assert dict(from_dict(raw).train.recipes["defectnet"].arch) == {}
