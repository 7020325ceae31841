"""The layers stay apart. No module of opscore/domain imports the store, the API layer, gRPC or
the generated protobuf code: it reaches persistence through its own ports (domain/ports.py). And
no module of opscore/store imports the modules that decide outcomes (the state machine, the
graph, the retry policy): the store is handed the state machine as a port (`ports.Rules`). The
SDK (opscore/client) is no part of the server: of it, it uses the clock alone; and the operator's
commands (opscore/commands) reach the server through the SDK alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import opscore.client
import opscore.commands
import opscore.domain
import opscore.store

DOMAIN = Path(opscore.domain.__file__).parent
STORE = Path(opscore.store.__file__).parent
FORBIDDEN = ("opscore.store", "opscore.api", "grpc", "opscore.v1")
_INSIDE = tuple(f"{layer}." for layer in FORBIDDEN)
CLIENT = Path(opscore.client.__file__).parent
COMMANDS = Path(opscore.commands.__file__).parent
SERVER_SIDE = (
    "opscore.api",
    "opscore.cli",
    "opscore.domain",
    "opscore.server",
    "opscore.store",
    "opscore.streams",
)
CLIENT_MAY_USE = ("opscore.domain.clock",)
DECISIONS = ("opscore.domain.machine", "opscore.domain.graph", "opscore.domain.retry")


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


def deciding(names: set[str]) -> list[str]:
    """The names that are, or are inside, a module that decides outcomes."""
    return sorted(
        name for name in names if any(name == m or name.startswith(f"{m}.") for m in DECISIONS)
    )


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


@pytest.mark.parametrize(
    "path", sorted(STORE.rglob("*.py")), ids=lambda path: str(path.relative_to(STORE))
)
def test_store_module_imports_no_decision(path: Path) -> None:
    package = ".".join(("opscore.store", *path.relative_to(STORE).parent.parts))
    assert deciding(imported(path.read_text(), package)) == []


@pytest.mark.parametrize(
    "source",
    [
        "from opscore.domain import graph",
        "from opscore.domain.retry import ResolvedRetryPolicy",
        "import opscore.domain.machine",
        "from ..domain import machine",
    ],
)
def test_every_form_of_a_decision_import_is_seen(source: str) -> None:
    assert deciding(imported(source, "opscore.store"))


def test_neighbours_of_forbidden_names_pass() -> None:
    assert forbidden(imported("import grpcio_like\nfrom opscore import streams", "opscore")) == []


@pytest.mark.parametrize(
    "path",
    sorted([*CLIENT.glob("*.py"), *COMMANDS.glob("*.py")]),
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_client_module_imports_nothing_of_the_server_but_its_clock(path: Path) -> None:
    names = imported(path.read_text(), f"opscore.{path.parent.name}")
    server_side = [
        name
        for name in names
        if any(name == part or name.startswith(f"{part}.") for part in SERVER_SIDE)
        and not any(name == part or name.startswith(f"{part}.") for part in CLIENT_MAY_USE)
    ]
    assert server_side == []
