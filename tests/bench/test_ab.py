"""`python -m bench.ab` works end to end: it exports a git revision, serves it beside the working
tree and the ceiling, and prints each build's throughput and trickle latency. Nothing here is
about speed: the figures only have to be there and be positive."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git history it compares")
def test_a_revision_is_compared_with_the_working_tree() -> None:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OPSCORE_") and key not in ("PYTHONSAFEPATH", "PYTHONPATH")
    }
    arguments = ["--rounds", "1", "--shapes", "single", "--agents", "2", "--trickle", "3"]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.ab", *arguments, "--window", "0.5", "HEAD"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for build in ("ceiling", "working tree", "HEAD"):
        [throughput] = re.findall(
            rf"single x2 +{build}: +(\d+) tasks/s, ([\d.]+) of the ceiling", completed.stdout
        )
        [trickle] = re.findall(rf"trickle +{build}: p50 ([\d.]+) ms", completed.stdout)
        assert all(float(figure) > 0 for figure in (*throughput, trickle)), completed.stdout
