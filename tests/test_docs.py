"""The documentation agrees with the code: every config key is documented, every documented
key exists, the README stays short and no relative link is broken.

Text checks: the schema comes from ``locnet.config.load_schema`` (the schema YAML with the
method registry's list filled in, as the workflow validates against it), which imports
neither TensorFlow nor Keras; the rest is PyYAML and the standard library.

Config keys are dotted paths (``training.seeds``). The schema walk follows ``properties`` of
objects, resolves ``$ref``, and enters ``additionalProperties`` / ``patternProperties`` object
schemas with the placeholder ``<name>`` for the free key. Sibling properties that all share
one ``$ref`` definition (the six blocks under ``methods``, all ``#/definitions/method``) are
documented once, with the definition's name as placeholder: ``methods.<method>.level``, so a
newly registered method needs no line of its own (naming one, ``methods.heatmap_unet``, is
allowed).
"""

from __future__ import annotations

import re
from pathlib import Path

import locnet.config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"
README_MAX_LINES = 220
FREE_KEY = "<name>"

_CODE = re.compile(r"`([^`]+)`")
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


# ---- the schema ------------------------------------------------------------------------------

def _resolve(node: dict, schema: dict) -> dict:
    """``node`` with its ``$ref`` (local, ``#/...``) replaced by the definition it points to."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/") or ref in seen:
            raise ValueError(f"cannot resolve $ref {ref!r}")
        seen.add(ref)
        target = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def schema_keys(schema: dict) -> tuple[set[str], set[str]]:
    """(keys the reference must document, every name a documented key may have).

    The first set has each shared-``$ref`` family once under its placeholder; the second adds
    the concrete expansions of those families and the placeholder parents themselves.
    """
    required: set[str] = set()
    valid: set[str] = set()

    def visit(node: dict, prefix: list[str], concrete: bool) -> None:
        node = _resolve(node, schema)
        if not isinstance(node, dict):
            return
        props = node.get("properties") or {}
        refs = {sub.get("$ref") if isinstance(sub, dict) else None for sub in props.values()}
        shared = len(props) > 1 and len(refs) == 1 and None not in refs
        for name, sub in props.items():
            path = ".".join(prefix + [name])
            valid.add(path)
            if not concrete and not shared:  # a family is documented once, by its placeholder
                required.add(path)
            visit(sub, prefix + [name], concrete=concrete or shared)
        if shared:
            placeholder = "<" + next(iter(refs)).rsplit("/", 1)[-1] + ">"
            valid.add(".".join(prefix + [placeholder]))
            if not concrete:
                required.add(".".join(prefix + [placeholder]))
            visit(next(iter(props.values())), prefix + [placeholder], concrete=concrete)
        free = [node.get("additionalProperties")] + list((node.get("patternProperties") or {}).values())
        for sub in free:
            if isinstance(sub, dict):
                path = ".".join(prefix + [FREE_KEY])
                valid.add(path)
                if not concrete:
                    required.add(path)
                visit(sub, prefix + [FREE_KEY], concrete=concrete)
        for key in ("oneOf", "anyOf", "allOf"):
            for sub in node.get(key) or []:
                visit(sub, prefix, concrete=concrete)

    visit(schema, [], concrete=False)
    return required, valid


# ---- the configuration reference -------------------------------------------------------------

def _outside_code_blocks(text: str):
    """Lines of ``text`` that are not inside a fenced code block."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def documented_keys(text: str) -> list[str]:
    """Backticked names in the key column of the reference tables (first header cell
    ``key``) and in the headings of the ``## Reference`` section."""
    keys: list[str] = []
    in_reference = False
    in_key_table = False
    for line in _outside_code_blocks(text):
        stripped = line.strip()
        if stripped.startswith("#"):
            level = len(stripped) - len(stripped.lstrip("#"))
            if level <= 2:
                in_reference = stripped.lstrip("#").strip().lower() == "reference"
            elif in_reference:
                keys += _CODE.findall(stripped)
            in_key_table = False
            continue
        if not stripped.startswith("|"):
            in_key_table = False
            continue
        cells = [c.strip() for c in stripped.strip("|").split("|")]
        if not in_key_table:
            in_key_table = cells[0].lower() == "key"
            continue
        if set(cells[0]) <= set("-: "):
            continue  # the separator row
        keys += _CODE.findall(cells[0])
    return keys


def missing_keys(schema: dict, doc: str) -> list[str]:
    required, _ = schema_keys(schema)
    return sorted(required - set(documented_keys(doc)))


def unknown_keys(schema: dict, doc: str) -> list[str]:
    _, valid = schema_keys(schema)
    return sorted({k for k in documented_keys(doc) if k not in valid})


# ---- links -----------------------------------------------------------------------------------

def relative_links(text: str) -> list[str]:
    """Link and image targets of a markdown text, outside code, without web links and
    same-page anchors; a target's own ``#anchor`` is dropped."""
    targets = []
    for line in _outside_code_blocks(text):
        line = re.sub(r"`[^`]*`", "", line)
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http:, https:, mailto: ...; anchors on the same page
            targets.append(target.split("#", 1)[0])
    return targets


def broken_links(md_file: Path) -> list[str]:
    text = md_file.read_text(encoding="utf-8")
    return [f"{md_file.relative_to(ROOT)}: {t}" for t in relative_links(text)
            if not (md_file.parent / t).exists()]


def markdown_files() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))


# ---- tests -----------------------------------------------------------------------------------

def _schema() -> dict:
    return locnet.config.load_schema()


def _schema_name() -> str:
    path = Path(locnet.config.SCHEMA_PATH).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def test_schema_walk_finds_the_keys():
    """The walk itself: nested, shared-$ref and concrete keys (guards against a silent
    walk that finds nothing and so passes everything)."""
    required, valid = schema_keys(_schema())
    assert {"seed", "training.seeds", "split.counts.test", "pyramid.intensity.mode",
            "methods.<method>", "methods.<method>.level",
            "methods.<method>.unet.filters"} <= required
    assert "methods.heatmap_unet.level" in valid and "methods.heatmap_unet.level" not in required
    assert "methods.heatmap_unet" in valid and "methods.heatmap_unet" not in required
    assert len(required) > 60


def test_every_config_key_is_documented():
    missing = missing_keys(_schema(), CONFIG_DOC.read_text(encoding="utf-8"))
    assert not missing, (
        f"config keys of {_schema_name()} missing from the key column of "
        f"{CONFIG_DOC.relative_to(ROOT)}: {', '.join(missing)}")


def test_every_documented_key_exists():
    doc = CONFIG_DOC.read_text(encoding="utf-8")
    assert documented_keys(doc), f"no documented keys found in {CONFIG_DOC.relative_to(ROOT)}"
    unknown = unknown_keys(_schema(), doc)
    assert not unknown, (
        f"{CONFIG_DOC.relative_to(ROOT)} documents keys that are not in "
        f"{_schema_name()}: {', '.join(unknown)}")


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, more than {README_MAX_LINES}: move details to docs/")


def test_relative_links_point_to_files():
    files = [f for f in markdown_files() if f.exists()]
    assert README in files and len(files) > 2
    broken = [b for f in files for b in broken_links(f)]
    assert not broken, "broken relative links: " + "; ".join(broken)
