"""`python -m bench.ab` works end to end: it exports a git revision, serves it beside the working
tree and the ceiling, and prints each build's throughput and trickle latency. Nothing here is
about speed: the figures only have to be there and be positive."""

from __future__ import annotations

import re

import pytest
from processes import ROOT, run_from_root


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the git history it compares")
def test_a_revision_is_compared_with_the_working_tree() -> None:
    arguments = ["--rounds", "1", "--shapes", "single", "--agents", "2", "--trickle", "3"]
    printed = run_from_root("-m", "bench.ab", *arguments, "--window", "0.5", "HEAD")
    for build in ("ceiling", "working tree", "HEAD"):
        [throughput] = re.findall(
            rf"single x2 +{build}: +(\d+) tasks/s, ([\d.]+) of the ceiling", printed
        )
        [trickle] = re.findall(rf"trickle +{build}: p50 ([\d.]+) ms", printed)
        assert all(float(figure) > 0 for figure in (*throughput, trickle)), printed
