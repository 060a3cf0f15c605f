"""Config validation: defaults are filled, typos and wrong types stop with the key's name."""

import pytest
import yaml

from locnet import config as cfgmod

ROOT = cfgmod.SCHEMA_PATH.parents[2]


@pytest.mark.parametrize("name", ["config.yaml", "config/tiny.yaml", "config/paper.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = cfgmod.load(ROOT / name)
    n0, levels = cfg["pyramid"]["finest_shape"], cfg["pyramid"]["levels"]
    assert n0 % 2 ** (levels - 1) == 0


def test_paper_config_is_the_paper():
    cfg = cfgmod.load(ROOT / "config/paper.yaml")
    assert cfg["pyramid"]["finest_shape"] == 448
    assert cfg["pyramid"]["finest_spacing_mm"] == 0.5
    assert cfg["pyramid"]["levels"] == 4
    assert cfg["synthetic"]["n_cases"] == 263
    assert cfg["split"]["proportions"] == [167, 42, 54]


def test_defaults_are_filled():
    cfg = cfgmod.validate({})
    assert cfg["pyramid"]["levels"] == 4
    assert cfg["cohort"]["coordinate_system"] == "RAS"
    assert cfg["landmarks"] == ["left_bifurcation", "right_bifurcation"]


def test_unknown_key_is_named():
    with pytest.raises(cfgmod.ConfigError, match=r"pyramid\.finest_shap\b"):
        cfgmod.validate({"pyramid": {"finest_shap": 64}})


def test_wrong_type_is_named():
    with pytest.raises(cfgmod.ConfigError, match=r"synthetic\.noise_hu"):
        cfgmod.validate({"synthetic": {"noise_hu": "loud"}})


def test_estimator_is_one_of_two():
    assert cfgmod.validate({})["evaluation"]["estimator"] == "exact"
    assert cfgmod.validate({"evaluation": {"estimator": "window"}})["evaluation"]["estimator"] == "window"
    with pytest.raises(cfgmod.ConfigError, match=r"evaluation\.estimator"):
        cfgmod.validate({"evaluation": {"estimator": "fast"}})


def test_shape_not_divisible_by_levels():
    with pytest.raises(cfgmod.ConfigError, match="finest_shape"):
        cfgmod.validate({"pyramid": {"finest_shape": 100, "levels": 4}})


def test_files_source_needs_tables():
    with pytest.raises(cfgmod.ConfigError, match=r"cohort\.manifest"):
        cfgmod.validate({"cohort": {"source": "files"}})


def test_validation_does_not_mutate_input():
    raw = yaml.safe_load("pyramid: {levels: 3, finest_shape: 64}")
    cfgmod.validate(raw)
    assert raw == {"pyramid": {"levels": 3, "finest_shape": 64}}
