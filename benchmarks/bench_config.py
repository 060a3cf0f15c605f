"""The config of a benchmark run: config files merged in order, then ``KEY=VALUE``
overrides (dotted paths, YAML values), validated as the workflow validates its config.
Shared by ``map_prior.py``, ``epoch_loop.py`` and ``device_cohort.py``."""

from __future__ import annotations

from pathlib import Path


def set_key(cfg: dict, dotted: str, value) -> None:
    """``cfg[a][b][c] = value`` for ``dotted`` "a.b.c", creating the blocks on the way."""
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def load_config(files, overrides) -> dict:
    """The validated config of ``files`` (later ones override earlier ones) and
    ``overrides`` (``"methods.locnet_single.epochs=5"``, values read as YAML)."""
    import yaml

    from locnet import config as C

    raw: dict = {}
    for f in files:
        raw = _deep_merge(raw, yaml.safe_load(Path(f).read_text()) or {})
    for item in overrides:
        key, _, value = item.partition("=")
        set_key(raw, key, yaml.safe_load(value))
    return C.validate(raw)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
