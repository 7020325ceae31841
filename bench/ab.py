"""Compare builds, interleaved: the working tree's server against the server of other git
revisions, and both against the ceiling, in one run on the same machine.

    python -m bench.ab [--rounds N] [--shapes chain10 single] [--agents 8 64] [--trickle RUNS]
                       [--postgres URL] REVISION [REVISION ...]

Each revision's `opscore/` and `generated/` are exported with `git archive` into a temporary
directory, its `opscore.v1` pointed at its own generated code as an install would, and run from
there (`opscore serve` on a SQLite file of its own, or with `--postgres` on a fresh database of that
server). One server of each build and the ceiling run at once, and every step takes turns between
them, round after round: this machine's speed moves by tens of percent within minutes, and only
builds measured side by side compare. Printed: each build's median tasks/s and its ratio to the
ceiling round by round, and the trickle's p50 (trigger → first assignment). Two identical builds
measured 0.504 and 0.570 of the ceiling on chains in one run of three rounds: differences smaller
than that need more rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import ROOT
from bench.load import RunSpec
from bench.plan import FULL
from bench.run import SHAPES, Bench, raise_file_limit
from bench.servers import (
    ServerProcess,
    ceiling_server,
    free_port,
    opscore_server,
    postgres_database,
    sqlite_url,
)

WORKING_TREE = "working tree"


def export(revision: str, into: Path) -> Path:
    """The revision's `opscore/` and `generated/` in a directory of their own, `opscore.v1`
    linked to its generated code (the package layout an install gives)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "opscore", "generated"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "opscore" / "v1").symlink_to(Path("..") / "generated" / "opscore" / "v1")
    return into


def revision_server(label: str, tree: Path, workdir: Path, db_url: str) -> ServerProcess:
    """`opscore serve` from the exported `tree`, on `db_url`."""
    port = free_port()
    command = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(tree)!r}); from opscore.cli import main; "
        "sys.exit(main())",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        db_url,
    ]
    return ServerProcess(label, command, port, tree, workdir / f"{label}.log")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("revisions", nargs="+", help="git revisions to compare with")
    parser.add_argument("--rounds", type=int, default=5, help="turns each step takes")
    parser.add_argument("--shapes", nargs="*", default=["chain10"], choices=sorted(SHAPES))
    parser.add_argument("--agents", nargs="*", type=int, default=[8], help="agent counts")
    parser.add_argument("--trickle", type=int, default=0, help="runs a round at a trickle")
    parser.add_argument("--window", type=float, default=FULL.window, help="seconds counted")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run every build on a fresh database of this PostgreSQL server, not on SQLite",
    )
    args = parser.parse_args(argv)
    raise_file_limit()
    with tempfile.TemporaryDirectory(prefix="opscore-ab-") as temporary:
        workdir = Path(temporary)
        bench = Bench(dataclasses.replace(FULL, window=args.window), workdir, million=False)
        try:
            with contextlib.ExitStack() as stack:

                def database(label: str) -> str:
                    if args.postgres:
                        return stack.enter_context(postgres_database(args.postgres))
                    return sqlite_url(workdir / f"{label}.db")

                servers = {
                    "ceiling": ceiling_server(workdir),
                    WORKING_TREE: opscore_server("working", database("working"), workdir),
                }
                for index, revision in enumerate(args.revisions):
                    label = f"rev-{index}"
                    tree = export(revision, workdir / f"tree-{index}")
                    servers[revision] = revision_server(label, tree, workdir, database(label))
                running = {
                    name: stack.enter_context(bench.serving(server))
                    for name, server in servers.items()
                }
                _compare(bench, running, args)
        finally:
            bench.close()
    return 0


def _compare(bench: Bench, running: dict[str, ServerProcess], args: argparse.Namespace) -> None:
    """Every step of the comparison, the builds taking turns round after round."""
    for shape in args.shapes:
        definition, last, _ = SHAPES[shape]
        spec = RunSpec(workflow_name=definition, last=last)
        for count in args.agents:
            rounds: dict[str, list[float]] = {name: [] for name in running}
            for _ in range(args.rounds):
                for name, server in running.items():
                    rounds[name].append(bench.closed_loop(server, spec, count))
            _print_throughput(f"{shape} x{count}", rounds)
    if args.trickle:
        samples: dict[str, list[float]] = {name: [] for name in running}
        for _ in range(args.rounds):
            for name, server in running.items():
                samples[name].extend(bench.trickle(server, args.trickle))
        _print_trickle(samples)


def _print_throughput(step: str, rounds: dict[str, list[float]]) -> None:
    ceiling = rounds["ceiling"]
    for name, values in rounds.items():
        pairs = zip(values, ceiling, strict=True)
        ratios = " ".join(f"{value / base:.2f}" for value, base in pairs)
        print(
            f"{step:>12}  {name:>14}: {statistics.median(values):7.0f} tasks/s, "
            f"{statistics.median(values) / statistics.median(ceiling):.3f} of the ceiling "
            f"(rounds: {ratios})",
            flush=True,
        )


def _print_trickle(samples: dict[str, list[float]]) -> None:
    ceiling = statistics.median(samples["ceiling"])
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(
            f"{'trickle':>12}  {name:>14}: p50 {p50 * 1000:.3f} ms, {p50 / ceiling:.2f}x "
            f"the ceiling ({len(values)} runs)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
