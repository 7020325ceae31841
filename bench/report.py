"""What a benchmark run leaves behind: the table on the terminal (each Ops-Core figure beside
the ceiling's and as a ratio to it, with the issue's targets marked PASS or MISS, never
asserted), a JSON file (timestamped, plus latest.json), a PNG plot and the table in Markdown
beside it. `python -m bench.report FILE` prints the Markdown table of any results file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.plan import MILLION

RESULTS = Path(ROOT) / "bench" / "results"
"""Where `make bench` writes its results unless told otherwise."""

KINDS = ("opscore", "ceiling", "postgres")
"""Server kinds, in column order."""

Row = tuple[str, dict[str, float | None], str, str]
"""One table row: label, value per server kind, target text, verdict."""


def _get(tree: dict[str, Any], *path: str) -> float | None:
    """The number at `path` in the results, or None if that part was not measured."""
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


def _get_keys(tree: dict[str, Any], *path: str) -> list[str]:
    """The keys of the mapping at `path` in the results, in their order ([] if none)."""
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return []
        node = node[key]
    return list(node) if isinstance(node, dict) else []


SHAPE_NAMES = {"single": "1-task runs", "chain10": "10-task chains"}
"""How the table names each run shape in a target's description."""


def _ratio(value: float | None, base: float | None) -> float | None:
    """Value / base when both exist."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, with the measured value and PASS/MISS (None: not measured)."""
    plan = results["meta"]["plan"]
    depths = [str(depth) for depth in plan["depths"]]
    deepest = depths[-1] if depths else "0"
    found: list[dict[str, Any]] = []

    def add(name: str, text: str, value: float | None, check: Callable[[float], bool]) -> None:
        short, _, description = text.partition(" | ")
        found.append(
            {
                "name": name,
                "target": short,
                "description": description,
                "value": value,
                "pass": None if value is None else bool(check(value)),
            }
        )

    throughput = results.get("throughput", {})
    add(
        "throughput_single_8",
        ">= 50% of ceiling | durable throughput, 1-task runs, 8 agents",
        _ratio(
            _get(throughput, "opscore", "single", "8"), _get(throughput, "ceiling", "single", "8")
        ),
        lambda ratio: ratio >= 0.5,
    )
    add(
        "throughput_chain10_8",
        ">= 60% of ceiling | durable throughput, 10-task chains, 8 agents",
        _ratio(
            _get(throughput, "opscore", "chain10", "8"),
            _get(throughput, "ceiling", "chain10", "8"),
        ),
        lambda ratio: ratio >= 0.6,
    )
    latency = results.get("latency", {})
    add(
        "trickle_first_p50",
        "<= 2x ceiling | trickle trigger->assignment p50",
        _ratio(
            _get(latency, "opscore", "trickle", "first", "p50_ms"),
            _get(latency, "ceiling", "trickle", "first", "p50_ms"),
        ),
        lambda ratio: ratio <= 2.0,
    )
    half = [
        value
        for kind in ("first", "next")
        if (value := _get(latency, "opscore", "half_load", kind, "p99_ms")) is not None
    ]
    add(
        "half_load_p99",
        "<= 10 ms | half load p99 of trigger->assignment and complete->next",
        max(half) if half else None,
        lambda value: value <= 10.0,
    )
    depth = results.get("queue_depth", {})
    add(
        "queue_depth_p50",
        f"<= 1.2x the 0 queued p50 | dispatch p50 at {deepest} queued vs 0 (its empty twin's, "
        "measured in the same turns)",
        _ratio(
            _get(depth, "opscore", deepest, "p50_ms"),
            _get(depth, "opscore", deepest, "empty", "p50_ms"),
        ),
        lambda ratio: ratio <= 1.2,
    )
    add(
        "fleet_rss",
        f"< 1024 MiB | server RSS with {plan['fleet_agents']} idle agents",
        _get(results.get("fleet", {}), "opscore", "rss_mib"),
        lambda value: value < 1024,
    )
    add(
        "recovery_serving",
        f"< 5 s | SERVING on {plan['recovery_tasks']} queued tasks",
        _get(results.get("recovery", {}), "opscore", "serving_s"),
        lambda value: value < 5.0,
    )
    # "On PostgreSQL: report the same table; target >= 30% of the bare ceiling": both durable
    # throughput targets' rows, 1-task runs and 10-task chains.
    if results["meta"].get("postgres"):
        for shape, described in (("single", "1-task runs"), ("chain10", "10-task chains")):
            add(
                f"postgres_throughput_{shape}_8",
                f"PostgreSQL >= 30% of ceiling | PostgreSQL durable throughput, {described}, "
                "8 agents",
                _ratio(
                    _get(throughput, "postgres", shape, "8"),
                    _get(throughput, "ceiling", shape, "8"),
                ),
                lambda ratio: ratio >= 0.3,
            )
    if results.get("replicas"):
        _replica_targets(results["replicas"], add)
    return found


def _replica_targets(
    replicas: dict[str, Any], add: Callable[[str, str, float | None, Callable[[float], bool]], None]
) -> None:
    """The targets of the replicas scenario (issue 25): across replicas, a trickle's p99 under
    10 ms and its p50 within 2x of the same replica's; two replicas' throughput no lower than
    one's; and at the deepest backlog measured (1,000,000 with `--million`), a replica's RSS at
    most 256 MiB above its idle size and its dispatch p50 within 1.2x of its empty twin's."""
    add(
        "replicas_trickle_other_p99",
        "< 10 ms | trickle trigger->assignment p99, triggered on another replica than the agent's",
        _get(replicas, "postgres", "trickle", "other", "p99_ms"),
        lambda value: value < 10.0,
    )
    add(
        "replicas_trickle_other_p50",
        "<= 2x the same replica's | trickle trigger->assignment p50, triggered on another "
        "replica than the agent's, against triggered on its own",
        _ratio(
            _get(replicas, "postgres", "trickle", "other", "p50_ms"),
            _get(replicas, "postgres", "trickle", "same", "p50_ms"),
        ),
        lambda ratio: ratio <= 2.0,
    )
    for shape in _get_keys(replicas, "postgres", "throughput"):
        add(
            f"replicas_throughput_{shape}",
            f">= 1 replica's | throughput of 2 replicas against 1, {SHAPE_NAMES.get(shape, shape)}",
            _ratio(
                _get(replicas, "postgres", "throughput", shape, "2"),
                _get(replicas, "postgres", "throughput", shape, "1"),
            ),
            lambda ratio: ratio >= 1.0,
        )
    depths = _get_keys(replicas, "postgres", "backlog")
    if depths:
        deepest = max(depths, key=int)
        idle = _get(replicas, "postgres", "backlog", "0", "rss_mib")
        full = _get(replicas, "postgres", "backlog", deepest, "rss_mib")
        add(
            "replica_backlog_rss",
            f"<= 256 MiB above idle | a replica's RSS with {deepest} queued, above its own with "
            "none",
            None if idle is None or full is None else full - idle,
            lambda growth: growth <= 256.0,
        )
        add(
            "replica_backlog_p50",
            f"<= 1.2x the empty twin's | a replica's dispatch p50 at {deepest} queued against "
            "its empty twin's, probed in the same turns",
            _ratio(
                _get(replicas, "postgres", "backlog", deepest, "p50_ms"),
                _get(replicas, "postgres", "backlog", deepest, "empty", "p50_ms"),
            ),
            lambda ratio: ratio <= 1.2,
        )


def _verdict(found: list[dict[str, Any]], name: str) -> tuple[str, str]:
    """The target text and PASS/MISS (or n/a) of the target `name`."""
    for target in found:
        if target["name"] == name:
            verdict = {True: "PASS", False: "MISS", None: "n/a"}[target["pass"]]
            return target["target"], verdict
    return "", ""


def _rows(results: dict[str, Any]) -> list[Row]:
    """Every figure of the run, as table rows."""
    found = results.get("targets", [])
    rows: list[Row] = []

    def add(
        label: str,
        path: tuple[str, ...],
        section: str,
        *names: str,
        paths: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """A row of the figures at `path` under each kind in `section` (at `paths[kind]` where
        a kind keeps it elsewhere), marked with the targets `names`."""
        values = {
            kind: _get(results.get(section, {}), kind, *(paths or {}).get(kind, path))
            for kind in KINDS
        }
        if all(value is None for value in values.values()):
            return
        marks = [_verdict(found, name) for name in names if name]
        marks = [(text, verdict) for text, verdict in marks if text]
        text = "; ".join(text for text, _ in marks)
        verdict = "/".join(verdict for _, verdict in marks)
        rows.append((label, values, text, verdict))

    plan = results["meta"]["plan"]
    for shape in plan["shapes"]:
        for count in plan["agent_counts"]:
            target = f"throughput_{shape}_{count}" if count == 8 else ""
            postgres = f"postgres_throughput_{shape}_{count}" if count == 8 else ""
            add(
                f"throughput {shape}, {count} agents (tasks/s)",
                (shape, str(count)),
                "throughput",
                target,
                postgres,
            )
    for phase in ("half_load", "trickle"):
        for kind, what in (
            ("first", "trigger->assignment"),
            ("next", "complete->next assignment"),
            ("run", "trigger->run succeeded"),
        ):
            for stat in ("p50_ms", "p99_ms"):
                target = ""
                if phase == "trickle" and kind == "first" and stat == "p50_ms":
                    target = "trickle_first_p50"
                if phase == "half_load" and kind in ("first", "next") and stat == "p99_ms":
                    target = "half_load_p99"
                label = f"{phase.replace('_', ' ')} {what} {stat[:3]} (ms)"
                add(label, (phase, kind, stat), "latency", target)
    # The target compares the plan's deepest queue with the empty twin probed in the same
    # turns; 1M (`--million`) is shown beside, unmarked.
    planned = [str(depth) for depth in plan["depths"]]
    depths = planned + ([str(MILLION)] if results["meta"].get("million") else [])
    for depth in depths:
        compared = "queue_depth_p50" if depth == planned[-1] else ""
        for stat in ("p50_ms", "p99_ms"):
            target = compared if stat == "p50_ms" else ""
            add(f"dispatch, {depth} queued, {stat[:3]} (ms)", (depth, stat), "queue_depth", target)
        add(
            f"dispatch, empty twin beside {depth} queued, p50 (ms)",
            (depth, "empty", "p50_ms"),
            "queue_depth",
            compared,
        )
    fleet = plan["fleet_agents"]
    add(f"fleet {fleet} agents: server RSS (MiB)", ("rss_mib",), "fleet", "fleet_rss")
    add(f"fleet {fleet} agents: connect all (s)", ("connect_s",), "fleet")
    add(f"fleet {fleet} agents: dispatch p50 (ms)", ("dispatch", "p50_ms"), "fleet")
    add(f"fleet {fleet} agents: dispatch p99 (ms)", ("dispatch", "p99_ms"), "fleet")
    tasks = plan["recovery_tasks"]
    add(f"recovery {tasks} queued: SERVING (s)", ("serving_s",), "recovery", "recovery_serving")
    add(f"recovery {tasks} queued: first push (s)", ("first_push_s",), "recovery")
    _replica_rows(results, add)
    return rows


def _replica_rows(results: dict[str, Any], add: Callable[..., None]) -> None:
    """The replicas scenario's rows, in the PostgreSQL column, the ceiling's figure beside where
    it has one (its throughput, its trickle with an agent of its own)."""
    replicas = results.get("replicas", {})
    agents = results["meta"]["plan"].get("replica_agents", 8)
    for shape in _get_keys(replicas, "postgres", "throughput"):
        for count in _get_keys(replicas, "postgres", "throughput", shape):
            add(
                f"replicas: throughput {shape}, {agents} agents, {_replicas(count)} (tasks/s)",
                ("throughput", shape, count),
                "replicas",
                f"replicas_throughput_{shape}" if count in ("1", "2") else "",
                paths={"ceiling": ("throughput", shape)},
            )
    for side, where in (("same", "same replica"), ("other", "another replica")):
        for stat in ("p50_ms", "p99_ms"):
            marks = {
                ("same", "p50_ms"): "replicas_trickle_other_p50",
                ("other", "p50_ms"): "replicas_trickle_other_p50",
                ("other", "p99_ms"): "replicas_trickle_other_p99",
            }
            add(
                f"replicas: trickle trigger->assignment {stat[:3]}, {where} (ms)",
                ("trickle", side, stat),
                "replicas",
                marks.get((side, stat), ""),
                paths={"ceiling": ("trickle", stat)},
            )
    counted = (
        ("cpu_ms_per_task", "replicas' CPU per task (ms)"),
        ("backend_cpu_ms_per_task", "PostgreSQL backends' CPU per task (ms)"),
        ("commits_per_task", "commits per task"),
        ("statements_per_task", "statements per task"),
        ("rows_written_per_task", "rows written per task"),
        ("scans_per_task", "table scans per task"),
    )
    for shape in _get_keys(replicas, "postgres", "cost"):
        for count in _get_keys(replicas, "postgres", "cost", shape):
            for name, what in counted:
                add(
                    f"replicas: {shape}, {_replicas(count)}: {what}",
                    ("cost", shape, count, name),
                    "replicas",
                )
    depths = _get_keys(replicas, "postgres", "backlog")
    deepest = max(depths, key=int) if depths else ""
    for depth in sorted(depths, key=int):
        marked = depth == deepest
        add(
            f"replica, {depth} queued: dispatch p50 (ms)",
            ("backlog", depth, "p50_ms"),
            "replicas",
            "replica_backlog_p50" if marked else "",
        )
        add(f"replica, {depth} queued: dispatch p99 (ms)", ("backlog", depth, "p99_ms"), "replicas")
        add(
            f"replica, empty twin beside {depth} queued: dispatch p50 (ms)",
            ("backlog", depth, "empty", "p50_ms"),
            "replicas",
            "replica_backlog_p50" if marked else "",
        )
        add(
            f"replica, {depth} queued: RSS (MiB)",
            ("backlog", depth, "rss_mib"),
            "replicas",
            "replica_backlog_rss" if marked or depth == "0" else "",
        )


def _replicas(count: str) -> str:
    """`1 replica`, `2 replicas`."""
    return f"{count} replica" + ("" if count == "1" else "s")


def _number(value: float | None) -> str:
    """A figure in a table cell."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cells(results: dict[str, Any]) -> list[list[str]]:
    """The table as cells, its header first: Ops-Core, ceiling, ratio (and PostgreSQL, ratio),
    target, verdict."""
    postgres = bool(results["meta"].get("postgres"))
    header = ["metric", "Ops-Core", "ceiling", "ratio"]
    if postgres:
        header += ["PostgreSQL", "ratio"]
    header += ["target", ""]
    lines: list[list[str]] = [header]
    for label, values, target, verdict in _rows(results):
        ceiling = values["ceiling"]
        cells = [
            label,
            _number(values["opscore"]),
            _number(ceiling),
            _number(_ratio(values["opscore"], ceiling)),
        ]
        if postgres:
            cells += [_number(values["postgres"]), _number(_ratio(values["postgres"], ceiling))]
        cells += [target, verdict]
        lines.append(cells)
    return lines


def _footer(results: dict[str, Any]) -> list[str]:
    """What is said under the table: the PostgreSQL server's settings, failed phases."""
    said = []
    settings = results["meta"].get("postgres_settings") or {}
    if settings:
        described = ", ".join(f"{name} {value}" for name, value in settings.items())
        said.append(f"PostgreSQL: {described}")
    source = _get_source(results)
    if source == "pg_stat_statements":
        said.append(
            "Replicas: statements per task from pg_stat_statements (BEGIN, COMMIT left out)."
        )
    elif source:
        said.append(
            "Replicas: pg_stat_statements is not loaded on this PostgreSQL, so statements are not "
            "counted: the database's work per task is its commits (pg_stat_database) and the rows "
            "written and table scans (pg_stat_user_tables)."
        )
    errors = results["meta"].get("errors") or []
    if errors:
        said.append(f"{len(errors)} phase(s) failed; see meta.errors in the JSON.")
    return said


def _get_source(results: dict[str, Any]) -> str:
    """Where the replicas scenario counted the database's statements ("" if it did not run)."""
    source = results.get("replicas", {}).get("postgres", {}).get("statements_from", "")
    return str(source)


def table(results: dict[str, Any]) -> str:
    """The terminal table, in aligned columns."""
    lines = _cells(results)
    widths = [max(len(line[index]) for line in lines) for index in range(len(lines[0]))]
    rendered = []
    for number, line in enumerate(lines):
        cells = [
            cell.ljust(width) if index in (0, len(line) - 2) else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        rendered.append("  ".join(cells).rstrip())
        if number == 0:
            rendered.append("  ".join("-" * width for width in widths))
    rendered += [f"\n{said}" for said in _footer(results)]
    return "\n".join(rendered)


def markdown(results: dict[str, Any]) -> str:
    """The same table in Markdown, to publish a run whole (as the performance notes do) without
    copying its figures by hand."""
    header, *lines = _cells(results)
    last = len(header) - 1
    aligned = ["---" if index in (0, last - 1, last) else "---:" for index in range(len(header))]
    rendered = ["| " + " | ".join(cells) + " |" for cells in (header, aligned, *lines)]
    rendered += [f"\n{said}" for said in _footer(results)]
    return "\n".join(rendered)


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels: dispatch latency against queue depth, throughput against agents; and a third,
    throughput against replicas, when the replicas scenario ran."""
    import matplotlib  # noqa: PLC0415 - the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    replicas = results.get("replicas", {})
    scaled = _get_keys(replicas, "postgres", "throughput")
    figure, axes = plt.subplots(1, 3 if scaled else 2, figsize=(18 if scaled else 12, 5.5))
    left, right = axes[0], axes[1]
    # One colour a server kind in both panels; the line's style says which figure it is.
    colours = {kind: f"C{index}" for index, kind in enumerate(KINDS)}
    for kind, depths in results.get("queue_depth", {}).items():
        points = sorted((int(depth), figures) for depth, figures in depths.items())
        xs = [depth for depth, _ in points]
        colour = colours.get(kind)
        for stat, style in (("p50_ms", "-o"), ("p99_ms", "--x")):
            left.plot(
                xs,
                [figures[stat] for _, figures in points],
                style,
                color=colour,
                label=f"{kind} {stat[:3]}",
            )
        if all("empty" in figures for _, figures in points):
            left.plot(
                xs,
                [figures["empty"]["p50_ms"] for _, figures in points],
                ":.",
                color=colour,
                label=f"{kind} p50, empty twin",
            )
    left.set_xscale("symlog", linthresh=1000)
    depths = sorted(
        {int(depth) for depths in results.get("queue_depth", {}).values() for depth in depths}
    )
    left.set_xticks(depths, [f"{depth // 1000}k" if depth else "0" for depth in depths])
    left.minorticks_off()
    left.set_yscale("log")
    left.yaxis.set_major_formatter(ScalarFormatter())  # milliseconds as numbers, not powers
    left.yaxis.set_minor_formatter(ScalarFormatter())
    left.set_xlabel("tasks queued that no agent can take")
    left.set_ylabel("trigger -> assignment (ms)")
    left.set_title("Dispatch latency against queue depth")
    _legend(left)
    styles = ("-o", "--s", ":^")
    for kind, shapes in results.get("throughput", {}).items():
        for index, (shape, counts) in enumerate(shapes.items()):
            points = sorted((int(count), value) for count, value in counts.items())
            right.plot(
                [count for count, _ in points],
                [value for _, value in points],
                styles[index % len(styles)],
                color=colours.get(kind),
                label=f"{kind} {shape}",
            )
    right.set_xscale("log")
    counts = sorted(
        {
            int(count)
            for shapes in results.get("throughput", {}).values()
            for c in shapes.values()
            for count in c
        }
    )
    right.set_xticks(counts, [str(count) for count in counts])
    right.minorticks_off()
    right.set_xlabel("agents")
    right.set_ylabel("completed tasks/s")
    right.set_title("Throughput against agents")
    _legend(right)
    if scaled:
        _replicas_panel(axes[2], results)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _replicas_panel(axes: Any, results: dict[str, Any]) -> None:
    """Throughput against the number of replicas, each shape beside the ceiling's."""
    replicas = results["replicas"]
    for index, (shape, counts) in enumerate(replicas["postgres"]["throughput"].items()):
        points = sorted((int(count), value) for count, value in counts.items())
        colour = f"C{index}"
        xs = [count for count, _ in points]
        axes.plot(xs, [value for _, value in points], "-o", color=colour, label=f"replicas {shape}")
        ceiling = _get(replicas, "ceiling", "throughput", shape)
        if ceiling is not None:
            axes.axhline(ceiling, linestyle=":", color=colour, label=f"ceiling {shape}")
        axes.set_xticks(xs)
    agents = results["meta"]["plan"].get("replica_agents", 8)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(f"replicas on one PostgreSQL database ({agents} agents spread over them)")
    axes.set_ylabel("completed tasks/s")
    axes.set_title("Throughput against replicas")
    _legend(axes)


def _legend(axes: Any) -> None:
    """The legend under a panel, if anything in it has a label."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="x-small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))


def write(results: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """The JSON, the PNG and the table in Markdown, each timestamped and as `latest`; the JSON's
    and the PNG's paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = directory / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False))
    png_path = directory / f"bench-{stamp}.png"
    plot(results, png_path)
    markdown_path = directory / f"bench-{stamp}.md"
    markdown_path.write_text(markdown(results) + "\n")
    for path in (json_path, png_path, markdown_path):
        (directory / f"latest{path.suffix}").write_bytes(path.read_bytes())
    return json_path, png_path


def main(argv: list[str] | None = None) -> int:
    """Print the table of a results file in Markdown."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="The table of a run of `make bench`, in Markdown.",
    )
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=RESULTS / "latest.json",
        help="a JSON file that `make bench` wrote (default: bench/results/latest.json)",
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    # Worked out again from the figures, as the run did: a file from before a target was
    # added (or one written by hand) gets its verdicts too.
    results["targets"] = targets(results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
