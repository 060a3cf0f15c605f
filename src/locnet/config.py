"""Load and validate a study config against the schema ``locnet/config.schema.yaml``.

Validation fills defaults from the schema and stops on unknown keys or wrong types with a
message that names each offending key path (``pyramid.finest_shape: ...``), so a typo never
silently falls back to a default. A config that passes the schema is then checked for what a
schema cannot say (:func:`_check_consistency`): every size the models derive from it (pyramid
levels, U-Net inputs and patches, see :func:`_size_problems`) must be buildable. All such
problems are reported together, each naming the key to change and values that work.

Where a value came from: a study merges several config files (``config.yaml``, then each
``--configfile``, then ``--config``). :func:`load_yaml` reads one, naming the file, line and
column of a YAML error; :func:`key_sources` tells, for each key path, which of them set it
last, and :func:`validate` and :func:`split_counts_problem` name that source beside each
value they complain about. ``python -m locnet.config ARGS`` checks the YAML of every
``--configfile`` in a Snakemake command line (``scripts/study.sh`` runs it first), as
Snakemake reads those files before the workflow and names neither file nor line.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jsonschema
import yaml

from locnet import methods as method_registry

#: the config schema (JSON schema draft 7 in YAML), shipped inside the package
SCHEMA_PATH = Path(__file__).resolve().with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A config that does not satisfy the schema or the study's own consistency rules."""


def _default_filling_validator():
    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    """The config schema, with the method list of the registry (:mod:`locnet.methods`) filled
    in: ``run_methods`` accepts (and defaults to) every registered method, and ``methods``
    has one block of ``definitions.method`` per registered method."""
    with open(path) as fh:
        schema = yaml.safe_load(fh)
    props = schema["properties"]
    keys = list(method_registry.KEYS)
    props["run_methods"]["items"] = {"enum": keys}
    props["run_methods"]["default"] = keys
    props["methods"]["properties"] = {
        k: {"$ref": "#/definitions/method", "default": {}} for k in keys}
    return schema


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # name the unexpected key itself, not only its parent
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(",".join(extra))
    return ".".join(parts) or "<top level>"


def load_yaml(path: str | Path) -> dict:
    """Read one config file: a mapping, or ``{}`` for an empty file.

    A YAML error raises :class:`ConfigError` naming the file, the line and the column (and the
    line where the construct it breaks began), which Snakemake's "not valid JSON or YAML"
    does not.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None:
            what += f" ({context}, line {cmark.line + 1})"
        raise ConfigError(f"config file {where}: not valid YAML: {what}; check the "
                          "indentation (spaces only, the same depth for keys of one "
                          "mapping)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: needs keys at its top level (a mapping), got "
                          f"a {type(data).__name__}")
    return data


def key_sources(layers: Sequence[tuple[str, Mapping]]) -> dict[tuple[str, ...], str]:
    """``{key path: source}``: which layer set each key last.

    ``layers``: ``(name, mapping)`` in the order Snakemake merges them (``config.yaml``, each
    ``--configfile``, then ``--config``). A mapping merges into the mapping of the same name
    key by key, as Snakemake does; any other value replaces what was under its key.
    """
    out: dict[tuple[str, ...], str] = {}

    def walk(node: Mapping, prefix: tuple[str, ...], name: str) -> None:
        for key, value in node.items():
            path = prefix + (str(key),)
            if not isinstance(value, Mapping):
                for old in [p for p in out if p[:len(path)] == path and p != path]:
                    del out[old]
            out[path] = name
            if isinstance(value, Mapping):
                walk(value, path, name)

    for name, mapping in layers:
        walk(mapping or {}, (), name)
    return out


def source_of(sources: Mapping[tuple[str, ...], str] | None, *path: str) -> str | None:
    """The layer that set ``path`` (or the nearest key above it); None if no layer did
    (the schema's default)."""
    if not sources:
        return None
    for n in range(len(path), 0, -1):
        if tuple(path[:n]) in sources:
            return sources[tuple(path[:n])]
    return None


def _from(sources, *path: str) -> str:
    src = source_of(sources, *path)
    return f" (from {src})" if src else " (the schema's default)" if sources else ""


def split_counts_problem(cfg: Mapping[str, Any], n_cases: int, cohort: str,
                         sources: Mapping[tuple[str, ...], str] | None = None) -> str | None:
    """Why ``split.counts`` cannot split a cohort of ``n_cases`` (described by ``cohort``),
    naming the file each count came from; None when they fit (or are not set)."""
    counts = (cfg.get("split") or {}).get("counts")
    if not counts:
        return None
    values = counts if isinstance(counts, Mapping) else dict(zip(("train", "val", "test"),
                                                                counts))
    try:
        total = sum(int(v) for v in values.values())
    except (TypeError, ValueError):
        return None  # the schema reports a count that is not a number
    if total == n_cases:
        return None
    parts = ", ".join(f"{k} {v}{_from(sources, 'split', 'counts', str(k))}"
                      for k, v in values.items())
    return (f"split.counts: {parts} sum to {total}, but the cohort has {n_cases} cases "
            f"({cohort}); every case goes to one subset, so they must sum to {n_cases}. "
            "A --configfile merges into config.yaml key by key: give all three counts in "
            "one file, or split.counts: null for the proportions")


def validate(config: dict, schema: dict | None = None,
             sources: Mapping[tuple[str, ...], str] | None = None) -> dict:
    """Return a validated deep copy of ``config`` with schema defaults filled in.

    ``sources`` (:func:`key_sources`): each problem also names the file its key came from.
    """
    schema = load_schema() if schema is None else schema
    cfg = copy.deepcopy(config) if config is not None else {}
    validator = _default_filling_validator()(schema)
    # two passes: the first fills nested defaults, the second validates the filled result
    for _ in validator.iter_errors(cfg):
        pass
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}" for e in errors]
        if sources:
            lines = [line + _from(sources, *_key_path(e).split("."))
                     for line, e in zip(lines, errors)]
        raise ConfigError("invalid config:\n" + "\n".join(lines))
    _check_consistency(cfg)
    return cfg


#: the methods that read one whole pyramid level, and the multi-scale chains (from the registry)
SINGLE_LEVEL_METHODS = method_registry.single_level()
MULTISCALE_METHODS = method_registry.multiscale()


@functools.lru_cache(maxsize=1)
def _default_schema() -> dict:
    return load_schema()


def defaults(*path: str, schema: dict | None = None) -> dict:
    """The schema's defaults of the object at ``path`` (``"training"``,
    ``"definitions", "method"``): ``{key: default}`` for each property that has one. The
    schema is the one source of every default; the code reads them from here."""
    schema = _default_schema() if schema is None else schema
    node = schema
    for key in path:
        node = node["properties"][key] if key in node.get("properties", {}) else node[key]
    if "$ref" in node:
        node = defaults(*node["$ref"].lstrip("#/").split("/"), schema=schema)
        return node
    return {k: copy.deepcopy(v["default"]) for k, v in node.get("properties", {}).items()
            if "default" in v}


#: Keys of a method block that are training settings (they override the shared ``training``
#: block), not model settings.
TRAIN_KEYS = ("epochs", "learning_rate", "lr_decay", "batch_size", "schedule", "augment_shift_mm")


def method_config(config: dict, method: str) -> dict:
    """The model block of ``method`` in a validated config: its own keys over the shared
    ``unet`` block and, for the Loc-Net methods, over the shared ``map_supervision`` block;
    plus the landmark names."""
    from locnet import methods

    own = config["methods"][method]
    block = {k: v for k, v in own.items() if k not in ("enabled",) + TRAIN_KEYS}
    block["unet"] = {**config["unet"], **own.get("unet", {})}
    if methods.get(method).map_prior:
        shared = config.get("map_supervision") or defaults("definitions", "map_supervision")
        block["map_supervision"] = {**shared, **own.get("map_supervision", {})}
    else:
        block.pop("map_supervision", None)
    block["landmarks"] = list(config["landmarks"])
    return block


def training_config(config: dict, method: str) -> dict:
    """Training settings of ``method``: the shared ``training`` block (less ``seeds``),
    overridden by the method's own training keys."""
    out = {k: v for k, v in config["training"].items() if k != "seeds"}
    out.update({k: v for k, v in config["methods"][method].items() if k in TRAIN_KEYS})
    return out


def model_grid(config: dict) -> dict:
    """The pyramid grid and intensity preprocessing of a validated config, as every model
    stores it (``metadata.json``): inference on new scans reads it from there, so a model can
    never be applied at another grid or with another intensity mapping."""
    p = config["pyramid"]
    return {
        "finest_shape": p["finest_shape"],
        "finest_spacing_mm": p["finest_spacing_mm"],
        "levels": p["levels"],
        "window_hu": list(p["window_hu"]),
        "background_hu": p["background_hu"],
        # absent from the default study: a model without it is read as the CT window
        **({"intensity": dict(p["intensity"])} if p.get("intensity") else {}),
    }


def model_defaults() -> dict:
    """The defaults of a method's model keys: ``definitions.method`` (without ``enabled``)
    with the shared ``unet`` block's defaults under ``unet``."""
    out = {k: v for k, v in defaults("definitions", "method").items() if k != "enabled"}
    out["unet"] = defaults("definitions", "unet")
    return out


_MODEL_DEFAULTS = model_defaults()
DEFAULT_LEVEL = _MODEL_DEFAULTS["level"]
DEFAULT_PATCH = _MODEL_DEFAULTS["patch"]


def _nearby(n: int, d: int, least: int) -> str:
    """The multiples of ``d`` nearest ``n`` (at least ``least``), as "use a or b"."""
    down = (n // d) * d
    choices = [v for v in (down, down + d) if v >= least and v != n]
    if down < least:
        choices = [v for v in (-(-least // d) * d,) if v != n] or [d]
    return "use " + " or ".join(str(v) for v in choices)


def _unet_depth(cfg: dict, method: str) -> tuple[int, str]:
    """Depth (len(filters)) of a method's U-Net, and the config key that sets it."""
    own = cfg["methods"][method].get("unet", {})
    if "filters" in own:
        return len(own["filters"]), f"methods.{method}.unet.filters"
    return len(cfg["unet"]["filters"]), "unet.filters"


def _size_problems(cfg: dict) -> list[str]:
    """Every size that no model could be built with, in words naming the key to change.

    The one U-Net (``locnet.models.unet``) max-pools by 2 between its levels, so every input
    it takes must be divisible by its stride ``2^(depth - 1)``, depth = len(unet.filters):
    a single-level method's level (``finest_shape / 2^level``), a multi-scale chain's coarsest
    level (``finest_shape / 2^(levels - 1)``) and its patches (``patch``). A single-level
    method's level must exist; a chain needs two levels. Only the methods this run builds
    (enabled, and listed in ``run_methods`` where the config has that key) are checked.
    """
    pyr = cfg["pyramid"]
    n0, levels = int(pyr["finest_shape"]), int(pyr["levels"])
    problems: list[str] = []
    # divisors of finest_shape: (divisor, formula, why) -> methods needing it
    needs: dict[tuple[int, str, str], list[str]] = {}
    coarsest = 2 ** (levels - 1)
    needs[(coarsest, "2^(pyramid.levels - 1)",
           f"every level halves the one below it {levels - 1} times")] = []
    short_chains = []
    run = set(cfg.get("run_methods", SINGLE_LEVEL_METHODS + MULTISCALE_METHODS))
    for method in SINGLE_LEVEL_METHODS + MULTISCALE_METHODS:
        block = cfg["methods"][method]
        if method not in run or not block.get("enabled", True):
            continue  # never built in this run
        depth, depth_key = _unet_depth(cfg, method)
        stride = 2 ** (depth - 1)
        halves = (f"a U-Net of depth {depth} ({depth_key} has {depth} entries), which "
                  f"halves it {depth - 1} times")
        if method in SINGLE_LEVEL_METHODS:
            level = int(block.get("level", DEFAULT_LEVEL))
            if not 0 <= level < levels:
                allowed = "0" if levels == 1 else f"0 to {levels - 1}"
                problems.append(
                    f"methods.{method}.level: {level} is outside the pyramid "
                    f"(pyramid.levels: {levels}); use {allowed}, or raise pyramid.levels")
                continue
            if stride > 1:
                formula = f"2^(methods.{method}.level) x 2^(unet depth - 1) = {2 ** level} x {stride}"
                why = (f"level {level} ({n0} / {2 ** level} = {n0 / 2 ** level:g} voxels) "
                       f"enters {halves}")
                needs.setdefault((2 ** level * stride, formula, why), []).append(method)
            continue
        if levels < 2:
            short_chains.append(method)
            continue
        if stride > 1:
            formula = f"2^(pyramid.levels - 1) x 2^(unet depth - 1) = {coarsest} x {stride}"
            why = (f"the coarsest level ({n0} / {coarsest} = {n0 / coarsest:g} voxels) "
                   f"enters {halves}")
            needs.setdefault((coarsest * stride, formula, why), []).append(method)
        patch = int(block.get("patch", DEFAULT_PATCH))
        if patch % stride:
            shown = f"{patch}" if "patch" in block else f"{patch} (the default)"
            problems.append(
                f"methods.{method}.patch: {shown} is not divisible by {stride} = "
                f"2^(unet depth - 1): each patch enters {halves}; "
                f"{_nearby(patch, stride, 2)} (or shorten {depth_key})")
    if short_chains:
        problems.append(
            f"pyramid.levels: {levels} is too few for {', '.join(short_chains)}: a multi-scale "
            "chain needs at least 2 levels; use pyramid.levels >= 2 or set "
            "methods.<name>.enabled: false")
    shape_problems = []  # first: the one key most problems come from
    need = max(d for d, _, _ in needs)  # powers of two: the largest is their lcm
    if n0 % need:
        fix = _nearby(n0, need, 8)
        for (d, formula, why), methods in sorted(needs.items(), key=lambda kv: -kv[0][0]):
            if n0 % d == 0:
                continue
            whose = f", needed by {', '.join(methods)}" if methods else ""
            shape_problems.append(
                f"pyramid.finest_shape: {n0} is not divisible by {d} = {formula}{whose}: "
                f"{why}; {fix}")
    return shape_problems + problems


def _check_consistency(cfg: dict) -> None:
    """All problems a schema cannot express, reported together."""
    problems = _size_problems(cfg)
    pyr = cfg["pyramid"]
    lo, hi = pyr["window_hu"]
    if not lo < hi:
        problems.append(f"pyramid.window_hu: lower bound {lo} must be below upper bound {hi}")
    pct = (pyr.get("intensity") or {}).get("percentiles")
    if pct is not None and not pct[0] < pct[1]:
        problems.append(f"pyramid.intensity.percentiles: lower {pct[0]} must be below upper "
                        f"{pct[1]}; e.g. [0.5, 99.5]")
    window = cfg["training"]["selection_window"]
    if window % 2 == 0:
        problems.append(f"training.selection_window: {window} is even; the window is centred "
                        f"on the epoch, so use an odd number ({window - 1} or {window + 1})")
    cohort = cfg["cohort"]
    if cohort["source"] == "files":
        for key in ("manifest", "landmarks"):
            if not cohort.get(key):
                problems.append(f"cohort.{key}: required when cohort.source is 'files'")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def load(path: str | Path) -> dict:
    return validate(load_yaml(path))


def configfiles_of(argv: Sequence[str]) -> list[str]:
    """The files after ``--configfile`` / ``--configfiles`` in a Snakemake command line."""
    files, taking = [], False
    for arg in argv:
        if arg in ("--configfile", "--configfiles"):
            taking = True
        elif arg.startswith(("--configfile=", "--configfiles=")):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif taking and not arg.startswith("-"):
            files.append(arg)
        else:
            taking = False
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m locnet.config SNAKEMAKE_ARGS...``: check the YAML of each --configfile."""
    argv = sys.argv[1:] if argv is None else list(argv)
    problems = []
    for path in configfiles_of(argv):
        try:
            load_yaml(path)
        except ConfigError as exc:
            problems.append(str(exc))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
