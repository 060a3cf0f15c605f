"""Serialization of every custom layer and every method's model, as keras-hub tests them.

For each custom layer (everything ``locnet`` registers with
``keras.saving.register_keras_serializable`` that is not a model) and each method's model
(:func:`locnet.models.build_model` for every key of :data:`locnet.methods.KEYS`):

* ``get_config()`` -> ``from_config()`` gives an object of the same class with the same config
  and, once the weights are copied, the same outputs (``run_layer_test``'s serialization part);
* a ``.keras`` file written by ``save`` and read by ``keras.saving.load_model`` gives the same
  class, config, weights and outputs (``run_model_saving_test``); layers are saved inside a
  one-layer functional model.

A ``get_config`` that drops a constructor argument fails twice over: every named argument of
``__init__`` must be a key of the config, and the settings the object keeps as plain attributes
(``noise_mm``, ``crop.background``, ...) must come back equal. The layers' arguments and the
models' config are set away from their defaults, so a lost value shows. ``RandomShift`` is
compared in inference mode (no noise) and, with its fixed seed, in training mode: the same
seed gives the same draws.
"""

from __future__ import annotations

import functools
import inspect
import json

import keras
import numpy as np
import pytest
from keras import ops

import locnet.layers
from locnet.methods import KEYS as METHODS
from locnet.models import MultiScaleLocNet, build_model
from locnet.models.unet import LocNet

RTOL = ATOL = 1e-6


def _np(x):
    return ops.convert_to_numpy(x)


def _assert_same_outputs(got, want, what):
    """Equal (nested dict or single) outputs, to float32 rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), what
        for key in want:
            _assert_same_outputs(got[key], want[key], f"{what}[{key!r}]")
        return
    np.testing.assert_allclose(_np(got), _np(want), rtol=RTOL, atol=ATOL, err_msg=what)


def _assert_config_complete(obj, config, what):
    """Every named argument of the class's ``__init__`` is a key of its config: a dropped key
    would come back at its default value."""
    params = [
        p.name for p in inspect.signature(type(obj).__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    missing = [p for p in params if p not in config]
    assert not missing, f"{what}: get_config() lacks {missing}"


def _plain(value):
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


@functools.cache
def _keras_attributes():
    """Attributes that Keras itself sets on layers and models (not settings of ours)."""
    inp = keras.Input((1,))
    functional = keras.Model(inp, keras.layers.Dense(1)(inp))
    return set(vars(keras.layers.Layer())) | set(vars(keras.Model())) | set(vars(functional))


def _settings(obj, prefix="", out=None, seen=None):
    """The plain-valued public attributes our classes set (``patch``, ``noise_mm``, ...), of
    ``obj`` and of the layers it holds (``crop.background``, ``level_nets[0].com_epsilon``)."""
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    skip = _keras_attributes() - {"name"}
    for key, value in vars(obj).items():
        if key.startswith("_") or key in skip:
            continue
        if _plain(value):
            out[prefix + key] = value
        elif isinstance(value, keras.layers.Layer):
            _settings(value, f"{prefix}{key}.", out, seen)
        elif (isinstance(value, (list, tuple)) and value
              and all(isinstance(v, keras.layers.Layer) for v in value)):
            for i, v in enumerate(value):
                _settings(v, f"{prefix}{key}[{i}].", out, seen)
    return out


def _assert_same_settings(got, want, what):
    assert _settings(got) == _settings(want), what


def _assert_same_weights(got, want, what):
    a, b = got.get_weights(), want.get_weights()
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: weight {i}")


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------
def _rng():
    return np.random.default_rng(0)


#: name -> (class, constructor kwargs (none at its default), inputs, draws random numbers)
LAYER_CASES = {
    "CenterOfMass": (
        locnet.layers.CenterOfMass,
        {"epsilon": 1e-3, "name": "com"},
        lambda: [_rng().random((2, 8, 10, 12, 3), dtype=np.float32)],
        False,
    ),
    "CropResample": (
        locnet.layers.CropResample,
        {"patch_size": 4, "background": 0.25, "name": "crop"},
        lambda: [
            _rng().random((2, 10, 9, 8, 2), dtype=np.float32),
            # inside, and hanging over the edges (background samples)
            np.array([[[4.3, 5.6, 4.2], [0.4, -0.7, 1.25], [8.1, 7.9, 6.6]],
                      [[7.8, 8.5, 7.2], [3.0, 4.0, 5.0], [1.5, 2.5, 3.5]]], np.float32),
        ],
        False,
    ),
    "RandomShift": (
        locnet.layers.RandomShift,
        {"max_shift": 2.5, "seed": 7, "name": "shift"},
        lambda: [_rng().normal(size=(2, 3, 3)).astype(np.float32)],
        True,
    ),
    "LocNet": (
        LocNet,
        {"input_size": 8, "out_channels": 2,
         "unet": {"filters": [2, 4], "convs_per_level": 2, "dropout": 0.1,
                  "upsampling": "transpose", "activation": "leaky_relu"},
         "out_activation": "relu", "com_epsilon": 1e-4, "name": "locnet"},
        lambda: [_rng().random((2, 8, 8, 8, 1), dtype=np.float32)],
        False,
    ),
}


def _registered(base, exclude=()):
    """The ``locnet>`` classes registered for Keras serialization that subclass ``base``."""
    return {
        cls.__name__ for key, cls in keras.saving.get_custom_objects().items()
        if key.startswith("locnet>") and isinstance(cls, type) and issubclass(cls, base)
        and not issubclass(cls, exclude)
    }


def test_every_custom_layer_has_a_case():
    in_module = {
        name for name, obj in vars(locnet.layers).items()
        if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
        and obj.__module__ == locnet.layers.__name__
    }
    layers = _registered(keras.layers.Layer, exclude=keras.Model)
    assert in_module <= layers, f"unregistered layers in locnet.layers: {in_module - layers}"
    assert set(LAYER_CASES) == layers  # LocNet (locnet.models.unet) included
    for name, (cls, *_rest) in LAYER_CASES.items():
        assert keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is cls
        assert keras.saving.get_registered_name(cls) == f"locnet>{name}"


def test_every_registered_model_is_some_methods_model():
    built = {type(build_model(m, TINY_CFG, TINY_GRID)).__name__ for m in METHODS}
    assert _registered(keras.Model) == built


def _make_layer(name):
    cls, kwargs, inputs, random = LAYER_CASES[name]
    keras.utils.set_random_seed(0)
    return cls(**kwargs), inputs(), random


def _assert_layer_config(layer, config, name):
    _assert_config_complete(layer, config, name)
    for kwarg, value in LAYER_CASES[name][1].items():
        assert config[kwarg] == value, f"{name}: config[{kwarg!r}]"


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_config_round_trip(name):
    layer, x, random = _make_layer(name)
    config = layer.get_config()
    json.dumps(config)  # what a .keras file stores
    _assert_layer_config(layer, config, name)
    clones = {
        "from_config": type(layer).from_config(config),
        "deserialize": keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer)),
    }
    if random:  # fresh layers, same seed: the same draws (before anything else draws)
        noisy = layer(*x, training=True)
        assert np.abs(_np(noisy) - x[0]).max() > 0.1  # the noise is on
        for how, clone in clones.items():
            _assert_same_outputs(clone(*x, training=True), noisy, f"{name} {how} training")
    want = layer(*x)
    for how, clone in clones.items():
        assert type(clone) is type(layer), how
        assert clone.get_config() == config, f"{name} {how}"
        _assert_same_settings(clone, layer, f"{name} {how}")
        if layer.weights:
            clone.set_weights(layer.get_weights())
        _assert_same_weights(clone, layer, f"{name} {how}")
        _assert_same_outputs(clone(*x), want, f"{name} {how}")


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_keras_file_round_trip(name, tmp_path):
    layer, x, random = _make_layer(name)
    inputs = [keras.Input(shape=a.shape[1:], name=f"input{i}") for i, a in enumerate(x)]
    model = keras.Model(inputs, layer(*inputs))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = loaded.get_layer(layer.name)
    assert type(restored) is type(layer)
    config = restored.get_config()
    _assert_layer_config(restored, config, name)
    assert config == layer.get_config()
    _assert_same_settings(restored, layer, name)
    _assert_same_weights(restored, layer, name)
    _assert_same_outputs(loaded(x), model(x), name)
    if random:  # neither has drawn since the save: the same seeded draws
        noisy = model(x, training=True)
        assert np.abs(_np(noisy) - x[0]).max() > 0.1
        _assert_same_outputs(loaded(x, training=True), noisy, f"{name} training")


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
# finest 16^3 at 5 mm, 3 levels (16, 8, 4 voxels), 4^3 patches, a 2-level U-Net of 2 and 4
# filters; the other settings away from their defaults (locnet.models.MODEL_DEFAULTS)
TINY_GRID = {"finest_shape": 16, "finest_spacing_mm": 5.0, "levels": 3}
TINY_CFG = {
    "landmarks": ["left", "right"],
    "level": 1,
    "patch": 4,
    "unet": {"filters": [2, 4], "convs_per_level": 2, "upsampling": "transpose"},
    "out_activation": "relu",
    "com_epsilon": 1e-4,
    "background": 0.1,
    "noise_mm": 5.0,
    "seed": 1,
    "heatmap_sigma_mm": 12.0,
    "heatmap_peak": 50.0,
    "heatmap_foreground_weight": 5.0,
    "regress_radius_mm": 30.0,
    "regression_weight": 2.0,
    "cls_threshold": 0.4,
}


def _tiny_inputs(batch=2):
    """Pyramid levels (B, n, n, n, 1) of a random finest volume, by 2x2x2 block means."""
    v = np.random.default_rng(0).random((batch, 16, 16, 16, 1))
    out = {"level0": v.astype(np.float32)}
    for level in range(1, TINY_GRID["levels"]):
        n = v.shape[1] // 2
        v = v.reshape(batch, n, 2, n, 2, n, 2, 1).mean(axis=(2, 4, 6))
        out[f"level{level}"] = v.astype(np.float32)
    return out


def _build(method):
    keras.utils.set_random_seed(0)
    model = build_model(method, TINY_CFG, TINY_GRID)
    # loss weights other than their initial ones: they are saved like any weight
    model.loss_weights.assign(np.linspace(0.1, 0.9, len(model.loss_levels)).astype("float32"))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_model_config_round_trip(method):
    model = _build(method)
    config = model.get_config()
    json.dumps(config)
    _assert_config_complete(model, config, method)
    x = _tiny_inputs()
    want = model(x)
    clone = type(model).from_config(config)
    assert type(clone) is type(model)
    assert clone.get_config() == config
    _assert_same_settings(clone, model, method)
    clone.set_weights(model.get_weights())
    _assert_same_weights(clone, model, method)
    _assert_same_outputs(clone(x), want, method)
    if isinstance(model, MultiScaleLocNet):  # the same seeded test-time noise
        _assert_same_outputs(clone(x, noise=True), model(x, noise=True), f"{method} noise")


@pytest.mark.parametrize("method", METHODS)
def test_model_keras_file_round_trip(method, tmp_path):
    model = _build(method)
    x = _tiny_inputs()
    want = model(x)
    path = tmp_path / f"{method}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    config = loaded.get_config()
    _assert_config_complete(loaded, config, method)
    assert config == model.get_config()
    _assert_same_settings(loaded, model, method)
    _assert_same_weights(loaded, model, method)
    np.testing.assert_allclose(_np(loaded.loss_weights), _np(model.loss_weights))
    _assert_same_outputs(loaded(x), want, method)
    if isinstance(model, MultiScaleLocNet):  # neither has drawn since the save
        _assert_same_outputs(loaded(x, noise=True), model(x, noise=True), f"{method} noise")
