"""The public API: every exported name resolves, and the layers import one way only."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import stars

PACKAGES = [
    "stars",
    "stars.neurons",
    "stars.models",
    "stars.data",
    "stars.synthesis",
    "stars.distill",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_resolve(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    for attr in module.__all__:
        assert getattr(module, attr) is not None, f"{name}.{attr}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = stars.no_such_thing


# docs/design.md section 2: a lower layer never imports a higher one.
FORBIDDEN = {
    "neurons": ("stars.models", "stars.synthesis", "stars.distill", "stars.pipeline", "stars.cli"),
    "models": ("stars.synthesis", "stars.distill", "stars.pipeline", "stars.cli"),
    "data": ("stars.synthesis", "stars.distill", "stars.pipeline", "stars.cli"),
    "synthesis": ("stars.distill", "stars.pipeline", "stars.cli"),
    "distill": ("stars.pipeline", "stars.cli"),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer: str) -> None:
    root = Path(stars.__file__).parent / layer
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(FORBIDDEN[layer]), f"{path.name} imports {n}"
