"""The benchmark's table marks each target on the rows it is computed from: the queue-depth target
compares the plan's deepest queue (100k) with the empty twin probed in the same turns, and with
`--million` the 1M rows are shown beside them unmarked, so a row never carries a verdict computed
from another."""

from __future__ import annotations

import json
from pathlib import Path

from processes import run_from_root

RESULTS = {
    "meta": {
        "million": True,
        "plan": {"shapes": [], "agent_counts": [], "depths": [0, 100_000]},
    },
    "queue_depth": {
        "opscore": {
            "0": {"p50_ms": 2.0, "p99_ms": 3.0, "empty": {"p50_ms": 2.0}},
            "100000": {"p50_ms": 2.2, "p99_ms": 3.1, "empty": {"p50_ms": 2.0}},
            "1000000": {"p50_ms": 3.0, "p99_ms": 4.0, "empty": {"p50_ms": 2.0}},
        },
        "ceiling": {
            "0": {"p50_ms": 1.0, "p99_ms": 2.0, "empty": {"p50_ms": 1.0}},
            "100000": {"p50_ms": 1.0, "p99_ms": 2.0, "empty": {"p50_ms": 1.0}},
            "1000000": {"p50_ms": 1.0, "p99_ms": 2.0, "empty": {"p50_ms": 1.0}},
        },
    },
}

TABLE = """
import json, sys
from bench.report import table, targets
results = json.loads(sys.argv[1])
results["meta"]["plan"].update(fleet_agents=10, recovery_tasks=10)
results["targets"] = targets(results)
print(table(results))
"""


def test_the_million_row_carries_no_verdict_of_the_100k_target() -> None:
    printed = run_from_root("-c", TABLE, json.dumps(RESULTS))
    rows = {line.split("  ")[0]: line for line in printed.splitlines()}

    # 2.2 / 2.0 = 1.1: the target is met at 100k, and said so on both rows it compares.
    assert rows["dispatch, 100000 queued, p50 (ms)"].endswith("PASS")
    assert rows["dispatch, empty twin beside 100000 queued, p50 (ms)"].endswith("PASS")
    # The shallower rows are shown, unmarked.
    assert rows["dispatch, 0 queued, p50 (ms)"].rstrip().endswith("2.00")
    # 3.0 / 2.0 = 1.5 at 1M: shown, but no target is measured there.
    for label in ("dispatch, 1000000 queued, p50 (ms)", "dispatch, empty twin beside 1000000"):
        million = next(row for name, row in rows.items() if name.startswith(label))
        assert "PASS" not in million
        assert "MISS" not in million
    assert "3.00" in rows["dispatch, 1000000 queued, p50 (ms)"]


def test_the_queue_depth_target_compares_with_the_twin_probed_in_the_same_turns() -> None:
    """The machine slowed between the probes with nothing queued and those at 100k (its empty
    twin, probed in the same turns, slowed as much): no miss is charged to the queue."""
    results = json.loads(json.dumps(RESULTS))
    results["meta"]["million"] = False
    results["queue_depth"]["opscore"] = {
        "0": {"p50_ms": 2.0, "p99_ms": 3.0, "empty": {"p50_ms": 2.0}},
        "100000": {"p50_ms": 3.0, "p99_ms": 4.0, "empty": {"p50_ms": 2.8}},
    }
    printed = run_from_root("-c", TABLE, json.dumps(results))
    rows = {line.split("  ")[0]: line for line in printed.splitlines()}

    # 3.0 / 2.8 = 1.07 met, where 3.0 against the 2.0 measured before the fill would be 1.5.
    assert rows["dispatch, 100000 queued, p50 (ms)"].endswith("PASS")
    # And a queue that does cost is caught: 3.0 against a twin at 2.0.
    results["queue_depth"]["opscore"]["100000"]["empty"]["p50_ms"] = 2.0
    printed = run_from_root("-c", TABLE, json.dumps(results))
    rows = {line.split("  ")[0]: line for line in printed.splitlines()}
    assert rows["dispatch, 100000 queued, p50 (ms)"].endswith("MISS")
    assert rows["dispatch, empty twin beside 100000 queued, p50 (ms)"].endswith("MISS")


def test_postgresql_is_held_to_its_target_on_both_durable_throughput_rows() -> None:
    """The issue's "On PostgreSQL: report the same table; target >= 30% of the bare ceiling":
    the 1-task row and the chains row each carry the SQLite verdict, then the PostgreSQL one."""
    results = {
        "meta": {
            "postgres": True,
            "plan": {"shapes": ["single", "chain10"], "agent_counts": [8], "depths": [0]},
        },
        "throughput": {
            "ceiling": {"single": {"8": 1000.0}, "chain10": {"8": 2000.0}},
            "opscore": {"single": {"8": 600.0}, "chain10": {"8": 1100.0}},
            "postgres": {"single": {"8": 350.0}, "chain10": {"8": 500.0}},
        },
    }
    printed = run_from_root("-c", TABLE, json.dumps(results))
    rows = {line.split("  ")[0]: line for line in printed.splitlines()}

    # 600 / 1000 and 350 / 1000: both met.
    assert rows["throughput single, 8 agents (tasks/s)"].endswith("PASS/PASS")
    # 1100 / 2000 = 0.55 < 0.60 and 500 / 2000 = 0.25 < 0.30: both missed.
    chains = rows["throughput chain10, 8 agents (tasks/s)"]
    assert "PostgreSQL >= 30% of ceiling" in chains
    assert chains.endswith("MISS/MISS")


def test_the_markdown_table_of_a_results_file_has_the_terminal_tables_rows(tmp_path: Path) -> None:
    """`python -m bench.report FILE` publishes a run's table as it was printed: the same rows,
    figures and verdicts, as a Markdown table with the PostgreSQL columns when they were run."""
    results = {
        "meta": {
            "postgres": True,
            "postgres_settings": {"autovacuum": "on"},
            "plan": {
                "shapes": ["chain10"],
                "agent_counts": [8],
                "depths": [0],
                "fleet_agents": 10,
                "recovery_tasks": 10,
            },
        },
        "throughput": {
            "ceiling": {"chain10": {"8": 2000.0}},
            "opscore": {"chain10": {"8": 1300.0}},
            "postgres": {"chain10": {"8": 500.0}},
        },
        "recovery": {"opscore": {"serving_s": 1.5, "first_push_s": 1.6}},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))

    printed = run_from_root("-m", "bench.report", str(path))

    lines = printed.splitlines()
    assert lines[0] == "| metric | Ops-Core | ceiling | ratio | PostgreSQL | ratio | target |  |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    # 1300 / 2000 = 0.65 met; 500 / 2000 = 0.25 missed. Verdicts come from the targets, which
    # the file need not hold: they are worked out from its figures.
    assert lines[2] == (
        "| throughput chain10, 8 agents (tasks/s) | 1,300 | 2,000 | 0.65 | 500 | 0.25 "
        "| >= 60% of ceiling; PostgreSQL >= 30% of ceiling | PASS/MISS |"
    )
    assert "| recovery 10 queued: SERVING (s) | 1.50 | - | - | - | - | < 5 s | PASS |" in lines
    assert "| recovery 10 queued: first push (s) | 1.60 | - | - | - | - |  |  |" in lines
    assert lines[-1] == "PostgreSQL: autovacuum on"


REPLICAS = {
    "meta": {
        "postgres": True,
        "million": True,
        "plan": {
            "shapes": [],
            "agent_counts": [],
            "depths": [0, 100_000],
            "fleet_agents": 10,
            "recovery_tasks": 10,
            "replica_agents": 8,
        },
    },
    "replicas": {
        "ceiling": {
            "throughput": {"single": 1000.0, "chain10": 2000.0},
            "trickle": {"p50_ms": 1.0, "p99_ms": 2.0},
        },
        "postgres": {
            "throughput": {
                "single": {"1": 300.0, "2": 330.0, "3": 340.0},
                "chain10": {"1": 500.0, "2": 450.0, "3": 470.0},
            },
            "trickle": {
                "replicas": 2,
                "same": {"p50_ms": 3.0, "p99_ms": 6.0},
                "other": {"p50_ms": 6.5, "p99_ms": 9.0},
            },
            "cost": {
                "single": {
                    "1": {
                        "cpu_ms_per_task": 1.5,
                        "backend_cpu_ms_per_task": 0.5,
                        "commits_per_task": 0.4,
                        "rows_written_per_task": 6.0,
                        "scans_per_task": 9.0,
                    }
                }
            },
            "statements_from": "pg_stat_user_tables",
            "backlog": {
                "0": {"p50_ms": 3.0, "p99_ms": 5.0, "rss_mib": 90.0, "empty": {"p50_ms": 3.0}},
                "100000": {
                    "p50_ms": 3.1,
                    "p99_ms": 5.0,
                    "rss_mib": 95.0,
                    "empty": {"p50_ms": 3.0},
                },
                "1000000": {
                    "p50_ms": 3.3,
                    "p99_ms": 6.0,
                    "rss_mib": 400.0,
                    "empty": {"p50_ms": 3.0},
                },
            },
        },
    },
}


def test_the_replicas_rows_carry_the_verdicts_they_are_computed_from() -> None:
    """Two replicas against one on both rows compared, the trickle across replicas against the
    same replica's, and the replica's RSS and dispatch at the deepest backlog (1M here) against
    its idle size and its empty twin: each verdict on the rows it compares, and only there."""
    printed = run_from_root("-c", TABLE, json.dumps(REPLICAS))
    rows = {line.split("  ")[0]: line for line in printed.splitlines()}

    # 330 / 300 = 1.1 met for 1-task runs; 450 / 500 = 0.9 missed for chains. The third
    # replica is shown, unmarked; the ceiling's throughput stands beside each.
    single = "replicas: throughput single, 8 agents, {} (tasks/s)"
    assert rows[single.format("1 replica")].endswith("PASS")
    assert rows[single.format("2 replicas")].endswith("PASS")
    assert rows[single.format("3 replicas")].rstrip().endswith("0.34")
    assert "1,000" in rows[single.format("3 replicas")]
    chains = "replicas: throughput chain10, 8 agents, {} (tasks/s)"
    assert rows[chains.format("2 replicas")].endswith("MISS")
    # 6.5 / 3.0 = 2.17: missed on both p50 rows; a p99 of 9 ms from another replica is met.
    trickle = "replicas: trickle trigger->assignment {}, {} (ms)"
    assert rows[trickle.format("p50", "same replica")].endswith("MISS")
    assert rows[trickle.format("p50", "another replica")].endswith("MISS")
    assert rows[trickle.format("p99", "another replica")].endswith("PASS")
    assert rows[trickle.format("p99", "same replica")].rstrip().endswith("3.00")
    # 400 - 90 = 310 MiB above idle: missed, on the idle row and the 1M row, not on 100k's.
    assert rows["replica, 0 queued: RSS (MiB)"].endswith("MISS")
    assert rows["replica, 1000000 queued: RSS (MiB)"].endswith("MISS")
    between = rows["replica, 100000 queued: RSS (MiB)"]
    assert "95.0" in between
    assert "PASS" not in between
    assert "MISS" not in between
    # 3.3 / 3.0 = 1.1 at 1M: met.
    assert rows["replica, 1000000 queued: dispatch p50 (ms)"].endswith("PASS")
    assert rows["replica, empty twin beside 1000000 queued: dispatch p50 (ms)"].endswith("PASS")
    assert "PASS" not in rows["replica, 100000 queued: dispatch p50 (ms)"]
    # What the database did per task, and where it was counted.
    assert "0.40" in rows["replicas: single, 1 replica: commits per task"]
    assert "6.00" in rows["replicas: single, 1 replica: rows written per task"]
    assert "pg_stat_statements is not loaded" in printed
