"""The shape of the code a newcomer reads: short functions, one method registry."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "locnet"
MAX_FUNCTION_LINES = 120


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_the_package_is_longer_than_the_limit():
    long = [f"{p.relative_to(SRC.parent)}:{line} {name} ({n} lines)"
            for p in sorted(SRC.rglob("*.py")) for name, line, n in _functions(p)
            if n > MAX_FUNCTION_LINES]
    assert not long, "functions over %d lines:\n%s" % (MAX_FUNCTION_LINES, "\n".join(long))


def test_method_keys_are_written_only_in_the_registry():
    """A method's key as a string literal outside locnet/methods.py is a second list of
    methods waiting to go stale (the multi-scale figures name their paper methods, which is
    allowed by naming the registry's constants instead)."""
    from locnet.methods import KEYS

    found = []
    for p in sorted(SRC.rglob("*.py")):
        if p.name == "methods.py" and p.parent == SRC:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in KEYS:
                found.append(f"{p.relative_to(SRC.parent)}:{node.lineno} {node.value!r}")
    assert not found, "method keys outside the registry:\n" + "\n".join(found)
