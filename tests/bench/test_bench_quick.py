"""`python -m bench --quick` works end to end: it starts the servers and the load processes, runs
every scenario briefly (on PostgreSQL too when the tests have a server, and then the replicas
scenario as well), and writes its JSON, PNG and Markdown table. Nothing here is about speed: the
figures only have to exist and be positive (the targets are reported by the benchmark, never
asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import POSTGRES_URL
from processes import ROOT, clean_environment, run_from_root

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
        "-m", "bench", "--quick", "--out", str(tmp_path), environment=environment, timeout=240.0
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
    if POSTGRES_URL:
        check_replicas(results, published)
    else:
        assert results["replicas"] == {}


def check_replicas(results: dict[str, Any], published: str) -> None:
    """The replicas scenario measured every deployment, the trickle on both sides, the cost of
    each step and the backlog, and its rows are in the table with their verdicts."""
    plan = results["meta"]["plan"]
    replicas = results["replicas"]["postgres"]
    counts = [str(count) for count in plan["replica_counts"]]
    for shape in plan["shapes"]:
        assert list(replicas["throughput"][shape]) == counts
        assert all(value > 0 for value in replicas["throughput"][shape].values())
        assert results["replicas"]["ceiling"]["throughput"][shape] > 0
        for count in counts:
            cost = replicas["cost"][shape][count]
            # Every replica of the deployment worked, and the database committed.
            assert len(cost["replica_cpu_s"]) == int(count)
            assert all(seconds > 0 for seconds in cost["replica_cpu_s"])
            assert cost["tasks"] > 0
            assert cost["cpu_ms_per_task"] > 0
            assert cost["commits_per_task"] > 0
            assert cost["rows_written_per_task"] > 0
            assert ("statements_per_task" in cost) is (
                replicas["statements_from"] == "pg_stat_statements"
            )
    for side in ("same", "other"):
        assert replicas["trickle"][side]["count"] == plan["replica_trickle_runs"]
        assert replicas["trickle"][side]["p50_ms"] > 0
    assert results["replicas"]["ceiling"]["trickle"]["count"] == plan["replica_trickle_runs"]
    # One replica with nothing queued (its idle size), then the plan's deepest backlog.
    backlog = replicas["backlog"]
    assert list(backlog) == ["0", str(plan["depths"][-1])]
    for figures in backlog.values():
        assert figures["rss_mib"] > 0
        assert figures["empty"]["rss_mib"] > 0
        assert figures["count"] == figures["empty"]["count"] == plan["depth_probes"]
    # Each target was worked out from the figures (met or missed, never "not measured").
    verdicts = {target["name"]: target["pass"] for target in results["targets"]}
    for name in (
        "replicas_trickle_other_p99",
        "replicas_trickle_other_p50",
        "replica_backlog_rss",
        "replica_backlog_p50",
        *(f"replicas_throughput_{shape}" for shape in plan["shapes"]),
    ):
        assert verdicts[name] in (True, False), name
    assert "| replicas: throughput single, 8 agents, 2 replicas (tasks/s) |" in published
    assert "| replicas: trickle trigger->assignment p99, another replica (ms) |" in published
    assert "| replica, 0 queued: RSS (MiB) |" in published


def test_the_replicas_scenario_alone_needs_postgresql() -> None:
    """`--replicas` runs only the replicas scenario, which is PostgreSQL's: without a server to
    run it on, the command says so and starts nothing."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--replicas"],
        cwd=ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    assert "OPSCORE_BENCH_POSTGRES_URL" in completed.stderr
