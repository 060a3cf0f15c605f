"""Load and validate a study config against ``workflow/schemas/config.schema.yaml``.

Validation fills defaults from the schema and stops on the first unknown key or wrong type
with a message that names the offending key path (``pyramid.finest_shape: ...``), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


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
    with open(path) as fh:
        return yaml.safe_load(fh)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # name the unexpected key itself, not only its parent
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(",".join(extra))
    return ".".join(parts) or "<top level>"


def validate(config: dict, schema: dict | None = None) -> dict:
    """Return a validated deep copy of ``config`` with schema defaults filled in."""
    schema = load_schema() if schema is None else schema
    cfg = copy.deepcopy(config) if config is not None else {}
    validator = _default_filling_validator()(schema)
    # two passes: the first fills nested defaults, the second validates the filled result
    for _ in validator.iter_errors(cfg):
        pass
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid config:\n" + "\n".join(lines))
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: dict) -> None:
    pyr = cfg["pyramid"]
    n0, levels = pyr["finest_shape"], pyr["levels"]
    if n0 % (2 ** (levels - 1)):
        raise ConfigError(
            f"  pyramid.finest_shape: {n0} is not divisible by 2**(levels-1) = {2 ** (levels - 1)}"
        )
    lo, hi = pyr["window_hu"]
    if not lo < hi:
        raise ConfigError(f"  pyramid.window_hu: lower bound {lo} must be below upper bound {hi}")
    cohort = cfg["cohort"]
    if cohort["source"] == "files":
        for key in ("manifest", "landmarks"):
            if not cohort.get(key):
                raise ConfigError(f"  cohort.{key}: required when cohort.source is 'files'")


def load(path: str | Path) -> dict:
    with open(path) as fh:
        return validate(yaml.safe_load(fh) or {})
