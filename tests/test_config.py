"""Config validation: defaults are filled, typos and wrong types stop with the key's name."""

import pytest
import yaml

from locnet import config as cfgmod
from locnet.methods import KEYS

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


# ---- sizes the models derive from the config (issue 11, item 10) -----------------------------
def _problems(raw):
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.validate(raw)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


def test_finest_shape_the_unet_cannot_pool_is_refused_with_its_fix():
    # 144 / 8 = 18 voxels at the coarsest level, not divisible by the U-Net's stride 8
    (line,) = _problems({"pyramid": {"finest_shape": 144}})
    assert line.startswith("pyramid.finest_shape: 144 is not divisible by 64 = "
                           "2^(pyramid.levels - 1) x 2^(unet depth - 1) = 8 x 8")
    assert "multiscale_e2e" in line and "unet.filters" in line
    assert line.endswith("use 128 or 192")


def test_patch_the_unet_cannot_pool_is_refused_with_its_fix():
    (line,) = _problems({"methods": {"multiscale_e2e": {"patch": 20}}})
    assert line.startswith("methods.multiscale_e2e.patch: 20 is not divisible by 8 = "
                           "2^(unet depth - 1)")
    assert "use 16 or 24" in line


def test_every_size_problem_is_reported_together():
    lines = _problems({"pyramid": {"finest_shape": 100},
                       "methods": {"locnet_single": {"level": 4},
                                   "multiscale_e2e_noise": {"patch": 12},
                                   "heatmap_unet": {"unet": {"filters": [4, 8, 16, 32, 64]}}},
                       "cohort": {"source": "files"}})
    keys = [line.split(":")[0] for line in lines]
    assert "methods.locnet_single.level" in keys
    assert "methods.multiscale_e2e_noise.patch" in keys
    assert "cohort.manifest" in keys and "cohort.landmarks" in keys
    shape = [line for line in lines if line.startswith("pyramid.finest_shape")]
    # the multi-scale chains (64), the heatmap U-Net's own deeper net at level 1 (32), the
    # patch baseline at level 1 (16), the pyramid itself (8); every fix satisfies them all
    assert [line.split(" = ")[0].split()[-1] for line in shape] == ["64", "32", "16", "8"]
    assert "methods.heatmap_unet.unet.filters" in shape[1]
    assert all(line.endswith("use 64 or 128") for line in shape)
    assert "use 0 to 3" in lines[keys.index("methods.locnet_single.level")]


def test_a_disabled_method_does_not_constrain_sizes():
    raw = {"pyramid": {"finest_shape": 96},  # 96 / 8 = 12: not a multiple of 8
           "methods": {m: {"enabled": False} for m in cfgmod.MULTISCALE_METHODS}}
    assert cfgmod.validate(raw)["pyramid"]["finest_shape"] == 96
    with pytest.raises(cfgmod.ConfigError, match="multiscale_multistep"):
        cfgmod.validate({"pyramid": {"finest_shape": 96}})
    if "run_methods" in cfgmod.load_schema()["properties"]:  # methods left out of this run
        cfgmod.validate({"pyramid": {"finest_shape": 96},
                         "run_methods": list(cfgmod.SINGLE_LEVEL_METHODS)})


def test_a_chain_needs_two_levels():
    lines = _problems({"pyramid": {"levels": 1, "finest_shape": 64},
                       "methods": {m: {"level": 0} for m in cfgmod.SINGLE_LEVEL_METHODS}})
    assert lines == ["pyramid.levels: 1 is too few for multiscale_multistep, multiscale_e2e, "
                     "multiscale_e2e_noise: a multi-scale chain needs at least 2 levels; use "
                     "pyramid.levels >= 2 or set methods.<name>.enabled: false"]


def test_size_defaults_are_the_models():
    from locnet import models

    assert cfgmod.DEFAULT_LEVEL == models.MODEL_DEFAULTS["level"]
    assert cfgmod.DEFAULT_PATCH == models.MODEL_DEFAULTS["patch"]
    assert set(cfgmod.SINGLE_LEVEL_METHODS + cfgmod.MULTISCALE_METHODS) == set(KEYS)


@pytest.mark.parametrize("finest_shape,levels,filters,patch", [
    (16, 2, [2, 2], 4),       # valid: every size divisible by 2
    (24, 3, [2, 2], 6),       # coarsest level 6 / 2 = 3: valid
    (24, 3, [2, 2, 2], 4),    # coarsest level 6 not divisible by 4
    (32, 2, [2, 2, 2], 6),    # patch 6 not divisible by 4
    (16, 3, [2, 2, 2], 4),    # coarsest level 4, level 1 = 8: valid
])
def test_validation_accepts_exactly_the_configs_whose_models_build(finest_shape, levels,
                                                                      filters, patch):
    from locnet import models

    raw = {"pyramid": {"finest_shape": finest_shape, "levels": levels},
           "unet": {"filters": filters},
           "methods": {m: ({"patch": patch} if m in cfgmod.MULTISCALE_METHODS else {})
                       for m in KEYS}}
    grid = {"finest_shape": finest_shape, "finest_spacing_mm": 2.0, "levels": levels}
    built = True
    for method in ("locnet_single", "patch_baseline", "multiscale_e2e"):
        block = {**raw["methods"][method], "unet": {"filters": filters}, "landmarks": ["a"]}
        try:
            models.build_model(method, block, grid)
        except ValueError:
            built = False
    try:
        cfgmod.validate(raw)
        valid = True
    except cfgmod.ConfigError:
        valid = False
    assert valid == built


def test_intensity_block_is_checked():
    assert "intensity" not in cfgmod.validate({})["pyramid"]  # absent: the CT window
    cfg = cfgmod.validate({"pyramid": {"intensity": {"mode": "percentile"}}})
    assert cfg["pyramid"]["intensity"] == {"mode": "percentile", "percentiles": [0.5, 99.5]}
    with pytest.raises(cfgmod.ConfigError, match=r"pyramid\.intensity\.mode"):
        cfgmod.validate({"pyramid": {"intensity": {"mode": "zscore"}}})
    with pytest.raises(cfgmod.ConfigError, match=r"pyramid\.intensity\.percentiles: lower 99"):
        cfgmod.validate({"pyramid": {"intensity": {"mode": "percentile",
                                                   "percentiles": [99, 1]}}})


def test_seeds_and_selection_window():
    cfg = cfgmod.validate({})
    assert cfg["training"]["seeds"] == 3 and cfg["training"]["selection_window"] == 1
    assert cfgmod.load(ROOT / "config/tiny.yaml")["training"]["seeds"] == 2  # CI runs 2 seeds
    with pytest.raises(cfgmod.ConfigError, match=r"training\.seeds"):
        cfgmod.validate({"training": {"seeds": 0}})
    with pytest.raises(cfgmod.ConfigError, match=r"training\.selection_window: 4 is even"):
        cfgmod.validate({"training": {"selection_window": 4}})
    # seeds are shared by all methods: a method block cannot set its own
    with pytest.raises(cfgmod.ConfigError, match="seeds"):
        cfgmod.validate({"methods": {"locnet_single": {"seeds": 5}}})


# ---- one source for the method list and for defaults -----------------------------------------
def test_the_schema_lists_exactly_the_registered_methods():
    props = cfgmod.load_schema()["properties"]
    assert list(props["methods"]["properties"]) == list(KEYS)
    assert props["run_methods"]["items"]["enum"] == list(KEYS)
    assert cfgmod.validate({})["run_methods"] == list(KEYS)
    with pytest.raises(cfgmod.ConfigError, match=r"run_methods"):
        cfgmod.validate({"run_methods": ["no_such_method"]})
    with pytest.raises(cfgmod.ConfigError, match=r"methods\.no_such_method"):
        cfgmod.validate({"methods": {"no_such_method": {}}})


def test_model_defaults_come_from_the_schema():
    from locnet import models

    schema = cfgmod.load_schema()
    method = schema["definitions"]["method"]["properties"]
    for key, value in models.MODEL_DEFAULTS.items():
        if key == "unet":
            unet = schema["definitions"]["unet"]["properties"]
            assert value == {k: unet[k]["default"] for k in unet}
        else:
            assert value == method[key]["default"], key
    # a validated config carries them in every method block
    cfg = cfgmod.validate({})
    for m in KEYS:
        assert cfg["methods"][m]["patch"] == models.MODEL_DEFAULTS["patch"]


def _layered(*names):
    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    raw = {}
    for name in names:
        raw = merge(raw, yaml.safe_load((ROOT / name).read_text()))
    return cfgmod.validate(raw)


def test_the_map_prior_is_on_by_default_off_for_the_paper_and_only_for_locnets():
    default = _layered("config.yaml")
    paper = _layered("config.yaml", "config/paper.yaml")  # as `--configfile config/paper.yaml`
    for method in KEYS:
        mc, pc = cfgmod.method_config(default, method), cfgmod.method_config(paper, method)
        if method in ("locnet_single", "multiscale_multistep", "multiscale_e2e",
                      "multiscale_e2e_noise"):
            assert mc["map_supervision"]["weight"] > 0
            assert pc["map_supervision"]["weight"] == 0  # the paper's Loc-Net, one line away
            assert mc["map_supervision"]["sigma_voxels"] == pc["map_supervision"]["sigma_voxels"]
        else:
            assert "map_supervision" not in mc and "map_supervision" not in pc
    # a method's own block overrides the shared one for that method only
    own = dict(default, methods={**default["methods"],
                                 "multiscale_e2e": {**default["methods"]["multiscale_e2e"],
                                                    "map_supervision": {"weight": 0.0}}})
    assert cfgmod.method_config(own, "multiscale_e2e")["map_supervision"]["weight"] == 0
    assert cfgmod.method_config(own, "locnet_single")["map_supervision"]["weight"] > 0
    assert cfgmod.method_config(own, "multiscale_e2e")["map_supervision"]["peak"] == 30.0


def test_config_yamls_patch_settings_do_not_leak_into_the_paper_or_tiny_configs():
    """config/paper.yaml and config/tiny.yaml are layered over config.yaml: the default study's
    own patch encoder, class weight and budget must not reach them."""
    default = _layered("config.yaml")
    mc = cfgmod.method_config(default, "patch_baseline")
    assert mc["positive_weight"] == 20 and len(mc["unet"]["filters"]) == 5
    assert cfgmod.training_config(default, "patch_baseline")["epochs"] == 50
    paper = _layered("config.yaml", "config/paper.yaml")
    pc, pt = cfgmod.method_config(paper, "patch_baseline"), cfgmod.training_config(paper,
                                                                                 "patch_baseline")
    assert pc["positive_weight"] is None and pc["level"] == 1  # balanced, as the paper's
    assert pc["unet"]["filters"] == paper["unet"]["filters"] == [16, 32, 64, 128]
    for key in ("epochs", "learning_rate"):
        assert pt[key] == paper["training"][key] == cfgmod.training_config(paper, "heatmap_unet")[key]
    # shift augmentation: the single-level methods of the default study, never the paper's
    for m in ("heatmap_unet", "locnet_single", "patch_baseline", "multiscale_multistep",
              "multiscale_e2e", "multiscale_e2e_noise"):
        want = 10.0 if not m.startswith("multiscale") else 0.0
        assert cfgmod.training_config(default, m)["augment_shift_mm"] == want, m
        assert cfgmod.training_config(paper, m)["augment_shift_mm"] == 0.0, m
        assert "augment_shift_mm" not in cfgmod.method_config(default, m)  # not a model key
        # leaky units everywhere but the patch encoder; the paper's ReLU in config/paper.yaml
        want = "relu" if m == "patch_baseline" else "leaky_relu"
        assert cfgmod.method_config(default, m)["unet"]["activation"] == want, m
        assert cfgmod.method_config(paper, m)["unet"]["activation"] == "relu", m
    tiny = _layered("config.yaml", "config/tiny.yaml")
    assert cfgmod.method_config(tiny, "patch_baseline")["unet"]["filters"] == [4, 8]
    assert cfgmod.training_config(tiny, "patch_baseline")["epochs"] == 3


# ---- config errors name their source ---------------------------------------------------------

BAD_INDENT = "split:\n  seed: 3\n pyramid:\n    levels: 3\n"


def test_a_yaml_error_names_the_file_and_the_line(tmp_path):
    bad = tmp_path / "overlay.yaml"
    bad.write_text(BAD_INDENT)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load_yaml(bad)
    msg = str(info.value)
    assert f"{bad}, line 3, column 2: not valid YAML" in msg and "indentation" in msg
    assert "(while parsing a block mapping, line 1)" in msg
    # python -m locnet.config checks every --configfile of a snakemake command line
    good = tmp_path / "good.yaml"
    good.write_text("seed: 1\n")
    assert cfgmod.configfiles_of(["-n", "--configfile", str(good), str(bad), "--cores", "2",
                                  f"--configfiles={good}"]) == [str(good), str(bad), str(good)]
    assert cfgmod.main(["--configfile", str(good)]) == 0
    assert cfgmod.main(["-n", "--configfile", str(good), str(bad)]) == 1


def test_split_counts_name_the_file_each_count_came_from():
    layers = [("config.yaml", {"split": {"seed": 1, "counts": {"train": 24, "val": 12,
                                                               "test": 32}},
                               "synthetic": {"n_cases": 68}}),
              ("overlay.yaml", {"split": {"counts": {"train": 4, "val": 2}}})]
    sources = cfgmod.key_sources(layers)
    assert sources[("split", "counts", "train")] == "overlay.yaml"
    assert sources[("split", "counts", "test")] == "config.yaml"
    cfg = {"split": {"counts": {"train": 4, "val": 2, "test": 32}}}
    msg = cfgmod.split_counts_problem(cfg, 68, "synthetic.n_cases: 68, from config.yaml",
                                      sources)
    assert ("train 4 (from overlay.yaml), val 2 (from overlay.yaml), test 32 (from "
            "config.yaml) sum to 38, but the cohort has 68 cases") in msg
    assert cfgmod.split_counts_problem(cfg, 38, "x", sources) is None
    # a value that is not a mapping replaces the keys under it
    sources = cfgmod.key_sources(layers + [("--config", {"split": {"counts": None}})])
    assert sources[("split", "counts")] == "--config"
    assert ("split", "counts", "test") not in sources


def test_a_schema_error_names_the_file_of_its_key():
    sources = cfgmod.key_sources([("config.yaml", {"pyramid": {"levels": 4}}),
                                  ("mine.yaml", {"pyramid": {"finest_shap": 64}})])
    with pytest.raises(cfgmod.ConfigError,
                       match=r"pyramid\.finest_shap: .* \(from mine\.yaml\)"):
        cfgmod.validate({"pyramid": {"levels": 4, "finest_shap": 64}}, sources=sources)
