"""`python -m bench.silent`, briefly: a silent agent with many slots, whose attempts expire
after a second, under steady load beside well-behaved agents. Its buffer stays within the bound
the settings give, no run fails for it under the default retry policy, and it ends quarantined.
Latency is reported by the benchmark, never asserted here."""

from __future__ import annotations

import json

from processes import run_from_root

from opscore.config import Settings

HEADROOM_MIB = 48
"""What the same short load costs the server without a silent agent, with room to spare: RSS
grew 7 MiB in 15 s of it (docs/performance.md)."""


def test_a_silent_agent_costs_bounded_memory_and_fails_no_run() -> None:
    output = run_from_root(
        "-m",
        "bench.silent",
        "--seconds",
        "6",
        "--lease",
        "1",
        "--no-baseline",
        "--json",
        timeout=60,
    )
    [row] = json.loads(output)
    assert (row["failed"], row["unfinished"]) == (0, 0), row["stuck"]
    assert row["runs"] > 0
    assert row["silent_state"] == "AGENT_STATE_ERROR"
    assert "lease" in row["silent_detail"]
    # One stream's buffer is bounded by the settings, whatever the load.
    bound_mib = Settings().streams.max_bytes / 2**20
    assert row["rss_peak_mib"] - row["rss_start_mib"] < bound_mib + HEADROOM_MIB
