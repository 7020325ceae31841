"""`python -m bench --quick` works end to end: it starts the servers and the load processes, runs
every scenario briefly (on PostgreSQL too when the tests have a server), and writes its JSON, PNG
and Markdown table. Nothing here is about speed: the figures only have to exist and be positive
(the targets are reported by the benchmark, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import POSTGRES_URL
from processes import run_from_root

SCENARIOS = ("throughput", "latency", "queue_depth", "fleet", "recovery")


def numbers(tree: Any) -> list[float]:
    """Every number in a JSON tree (booleans excluded)."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, int | float):
        return [float(tree)]
    if isinstance(tree, dict):
        return [number for value in tree.values() for number in numbers(value)]
    if isinstance(tree, list):
        return [number for value in tree for number in numbers(value)]
    return []


def test_quick_benchmark_runs(tmp_path: Path) -> None:
    # Given a PostgreSQL server (as CI is), every scenario runs on it as well.
    environment = {"OPSCORE_BENCH_POSTGRES_URL": POSTGRES_URL} if POSTGRES_URL else {}
    printed = run_from_root(
        "-m", "bench", "--quick", "--out", str(tmp_path), environment=environment
    )

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["meta"]["errors"] == []
    assert results["meta"]["postgres"] is bool(POSTGRES_URL)
    # Which PostgreSQL was measured, and how it is set up, goes with its figures.
    settings = results["meta"]["postgres_settings"]
    if POSTGRES_URL:
        assert set(settings) == {"server_version", "autovacuum", "fsync", "synchronous_commit"}
        assert settings["autovacuum"] in ("on", "off")
        assert settings["server_version"][0].isdigit()
        assert f"autovacuum {settings['autovacuum']}" in printed
    else:
        assert settings == {}
    kinds = ("opscore", "ceiling", "postgres") if POSTGRES_URL else ("opscore", "ceiling")
    for scenario in SCENARIOS:
        for kind in kinds:
            figures = numbers(results[scenario][kind])
            assert figures, (scenario, kind)
            assert all(figure > 0 for figure in figures), (scenario, kind, figures)
    # At every depth the filled server and its empty twin took the same number of probes.
    for kind in kinds:
        for figures in results["queue_depth"][kind].values():
            assert (
                figures["count"]
                == figures["empty"]["count"]
                == results["meta"]["plan"]["depth_probes"]
            )
    assert list(tmp_path.glob("bench-*.json"))
    pngs = list(tmp_path.glob("bench-*.png"))
    assert pngs
    assert all(png.stat().st_size > 0 for png in pngs)
    # The table in Markdown beside them, one row a figure as on the terminal.
    published = (tmp_path / "latest.md").read_text()
    assert published.startswith("| metric | Ops-Core | ceiling | ratio |")
    assert "| throughput single, 8 agents (tasks/s) |" in published
    assert published == next(tmp_path.glob("bench-*.md")).read_text()
