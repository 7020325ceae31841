"""The benchmark harness of Ops-Core: `python -m bench` (or `make bench`).

It runs the real server (`opscore serve`, a subprocess) and a bare grpc.aio server with the same
RPC shapes and no database (`bench.ceiling`, the ceiling), drives both with the same load
generator (agents and a trigger client in other processes), and reports every Ops-Core figure
beside the ceiling's and as a ratio to it.

`bench` lives at the repository root, beside the source directory `opscore/`, which has no `v1`
(the installed package maps `opscore.v1` onto `generated/`). Whoever runs `python -m bench` from
the root has the root first on `sys.path`, so `import opscore` would find the source directory and
miss `opscore.v1`. The root is moved to the end of `sys.path` here, before anything imports
`opscore`: `bench` is still found there, and `opscore` is the installed one. Spawned load
processes inherit the reordered path.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository root (the directory that holds `bench/`)."""


def _demote_root() -> None:
    """Move the repository root (however it is spelled on `sys.path`) behind everything else."""
    kept = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != ROOT]
    sys.path[:] = [*kept, ROOT]


_demote_root()
