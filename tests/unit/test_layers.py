"""The domain stays plain: no module of opscore/domain imports the store, the API layer, gRPC or
the generated protobuf code. It reaches persistence through its own ports (domain/ports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import opscore.domain

DOMAIN = Path(opscore.domain.__file__).parent
FORBIDDEN = ("opscore.store", "opscore.api", "grpc", "opscore.v1")
_INSIDE = tuple(f"{layer}." for layer in FORBIDDEN)


def imported(source: str, package: str) -> set[str]:
    """Every module `source` imports (at any depth, under TYPE_CHECKING too), absolute; for
    `from a import b`, both `a` and `a.b`, since `b` may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> list[str]:
    """The names that are, or are inside, a forbidden package."""
    return sorted(name for name in names if name.startswith(_INSIDE) or name in FORBIDDEN)


@pytest.mark.parametrize("path", sorted(DOMAIN.glob("*.py")), ids=lambda path: path.name)
def test_domain_module_imports_no_outer_layer(path: Path) -> None:
    assert forbidden(imported(path.read_text(), "opscore.domain")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import grpc",
        "import grpc.aio as aio",
        "from opscore.store.queries import Store",
        "from opscore import store",
        "from opscore.v1 import workflow_pb2",
        "from ..api import convert",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from opscore.store import rows",
        "def later() -> None:\n    import opscore.api.errors",
    ],
)
def test_every_form_of_import_is_seen(source: str) -> None:
    assert forbidden(imported(source, "opscore.domain"))


def test_neighbours_of_forbidden_names_pass() -> None:
    assert forbidden(imported("import grpcio_like\nfrom opscore import streams", "opscore")) == []
