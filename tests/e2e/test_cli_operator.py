"""The operator's commands of `opscore` (agents, definitions, runs) against a live server,
configured by OPSCORE_ADDRESS and OPSCORE_TOKEN: their JSON output parsed, their exit statuses
checked. Most run in this process (a command is a coroutine on a loop of its own, on a thread);
a watched run is followed by the installed console script, a process of its own, which exits 0
when the run succeeded and 1 otherwise."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import auth
import helpers
import pytest
from processes import OPSCORE, RUN_WAIT, clean_environment, free_port

from opscore import cli
from opscore.server import OpsCoreServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FLOW = """
workflow_name: flow
tasks:
  - name: first
    capability: work
    input: {size: 1}
  - name: second
    capability: work
    depends_on: [first]
"""


class Opscore:
    """The `opscore` command, pointed at one server by its environment: run in this process
    (on a thread of its own, as its coroutine runs on a loop of its own) with its output
    captured, or started as the installed console script."""

    def __init__(
        self,
        port: int,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        token: str = auth.OPERATOR_TOKEN,
    ) -> None:
        self.environment = {"OPSCORE_ADDRESS": f"127.0.0.1:{port}", "OPSCORE_TOKEN": token}
        self._capsys = capsys
        self._monkeypatch = monkeypatch

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """The console script started, its output piped."""
        return await asyncio.create_subprocess_exec(
            str(OPSCORE),
            *args,
            env=clean_environment(**self.environment),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def run(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        """The command run here to its end (bounded): its status, output and error output."""
        for name, value in self.environment.items():
            self._monkeypatch.setenv(name, value)
        self._monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        self._capsys.readouterr()
        async with asyncio.timeout(RUN_WAIT):
            code = await asyncio.to_thread(cli.main, list(args))
        out, err = self._capsys.readouterr()
        return code, out, err

    async def json(self, *args: str, stdin: str = "") -> Any:
        """The one JSON document a command that succeeds prints with `--output json`."""
        code, out, err = await self.run(*args, "--output", "json", stdin=stdin)
        assert code == 0, err
        [line] = out.splitlines()
        return json.loads(line)


async def ended(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """A process's status, output and error output, once it has ended; one still running
    after `RUN_WAIT` is killed, and the test fails with what it printed."""
    reading = asyncio.ensure_future(process.communicate())
    try:
        await asyncio.wait_for(asyncio.shield(reading), RUN_WAIT)
    except TimeoutError:
        process.kill()
        out, err = await reading
        raise AssertionError(f"still running:\n{out.decode()}\n{err.decode()}") from None
    out, err = reading.result()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def opscore(
    server: OpsCoreServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Opscore:
    return Opscore(server.port, capsys, monkeypatch)


async def test_definitions_from_yaml_and_json_files_listed_and_read(
    opscore: Opscore, tmp_path: Path
) -> None:
    summarize = await opscore.json(
        "definitions", "create", "-f", str(EXAMPLES / "summarize-url.yaml")
    )
    fan_out = await opscore.json("definitions", "create", "-f", str(EXAMPLES / "fan-out.json"))
    assert (summarize["workflow_name"], summarize["version"]) == ("summarize-url", 1)
    assert [t["name"] for t in summarize["tasks"]] == ["fetch", "summarize"]
    assert summarize["tasks"][0]["timeout"] == "60s"
    assert fan_out["tasks"][2]["fallback"] == "join-fallback"
    again = await opscore.json(
        "definitions", "create", "-f", "-", stdin=FLOW.replace("name: flow", "name: summarize-url")
    )
    assert again["version"] == 2

    listed = await opscore.json("definitions", "list", "--page-size", "2")
    assert [d["definition_id"] for d in listed["definitions"]] == [
        summarize["definition_id"],
        fan_out["definition_id"],
    ]
    rest = await opscore.json("definitions", "list", "--page-token", listed["next_page_token"])
    assert [d["version"] for d in rest["definitions"]] == [2]
    assert rest["next_page_token"] == ""
    versions = await opscore.json("definitions", "list", "--workflow", "summarize-url")
    assert [d["version"] for d in versions["definitions"]] == [1, 2]
    assert await opscore.json("definitions", "get", fan_out["definition_id"]) == fan_out

    code, out, _ = await opscore.run("definitions", "get", fan_out["definition_id"])
    assert code == 0
    assert "join-fallback" in out

    broken = tmp_path / "broken.yaml"
    broken.write_text("- not\n- a definition\n")
    code, _, err = await opscore.run("definitions", "create", "-f", str(broken))
    assert code == 2
    assert "does not hold a definition" in err
    code, _, err = await opscore.run("definitions", "create", "-f", str(tmp_path / "nowhere.yaml"))
    assert code == 2
    assert "does not exist" in err
    undecodable = tmp_path / "latin-1.yaml"
    undecodable.write_bytes("workflow_name: caf\u00e9\n".encode("latin-1"))
    code, _, err = await opscore.run("definitions", "create", "-f", str(undecodable))
    assert code == 2
    assert "cannot read" in err


async def test_agents_listed_and_read(opscore: Opscore, client: helpers.Client) -> None:
    await client.agent("a-1", capabilities=["work"], labels={"zone": "x"})
    await client.agent("a-2", capabilities=["other"], connect=False)

    listed = await opscore.json("agents", "list")
    assert [a["agent_id"] for a in listed["agents"]] == ["a-1", "a-2"]
    assert listed["agents"][0]["state"] == "AGENT_STATE_IDLE"
    working = await opscore.json("agents", "list", "--capability", "work")
    assert [a["agent_id"] for a in working["agents"]] == ["a-1"]
    offline = await opscore.json("agents", "list", "--state", "offline")
    assert [a["agent_id"] for a in offline["agents"]] == ["a-2"]
    paged = await opscore.json("agents", "list", "--page-size", "1")
    assert paged["next_page_token"]

    one = await opscore.json("agents", "get", "a-1")
    assert (one["connected"], one["labels"]) == (True, {"zone": "x"})
    code, out, _ = await opscore.run("agents", "list")
    assert code == 0
    assert "a-1" in out
    assert "IDLE" in out


async def test_runs_triggered_listed_read_and_cancelled(
    opscore: Opscore, client: helpers.Client
) -> None:
    await client.agent("pinned", capabilities=["work"], connect=False)
    await opscore.json("definitions", "create", "-f", "-", stdin=FLOW)

    run = await opscore.json(
        "runs", "trigger", "flow", "--input", '{"text": "hi"}', "--request-id", "r-1"
    )
    assert (run["workflow_name"], run["state"], run["input"]) == (
        "flow",
        "RUN_STATE_PENDING",
        {"text": "hi"},
    )
    same = await opscore.json(
        "runs", "trigger", "flow", "--input", '{"text": "hi"}', "--request-id", "r-1"
    )
    assert same["run_id"] == run["run_id"]
    pinned = await opscore.json("runs", "trigger", run["definition_id"], "--agent", "pinned")
    assert pinned["agent_id"] == "pinned"

    got = await opscore.json("runs", "get", run["run_id"])
    assert [t["name"] for t in got["tasks"]] == ["first", "second"]
    assert got["tasks"][0]["waiting_reason"]

    cancelled = await opscore.json("runs", "cancel", run["run_id"])
    assert cancelled["state"] == "RUN_STATE_CANCELLED"
    listed = await opscore.json("runs", "list", "--state", "cancelled", "--definition", "flow")
    assert [r["run_id"] for r in listed["runs"]] == [run["run_id"]]
    by_id = await opscore.json("runs", "list", "--definition", run["definition_id"])
    assert [r["run_id"] for r in by_id["runs"]] == [pinned["run_id"], run["run_id"]]
    by_agent = await opscore.json("runs", "list", "--agent", "pinned")
    assert [r["run_id"] for r in by_agent["runs"]] == [pinned["run_id"]]

    code, out, _ = await opscore.run("runs", "list")
    assert code == 0
    assert "CANCELLED" in out
    code, out, _ = await opscore.run("runs", "get", run["run_id"])
    assert code == 0
    assert "second" in out

    # Refusals: status 1, and with --output json the error as one JSON document.
    code, _, err = await opscore.run("runs", "cancel", run["run_id"], "--output", "json")
    assert code == 1
    refusal = json.loads(err)
    assert (refusal["code"], refusal["reason"]) == ("FAILED_PRECONDITION", "FAILED_PRECONDITION")
    code, _, err = await opscore.run(
        "definitions",
        "create",
        "-f",
        "-",
        stdin="{workflow_name: bad, tasks: [{name: a, depends_on: [b]}]}",
    )
    assert code == 1
    assert "INVALID_ARGUMENT" in err
    assert "definition.tasks[0].depends_on[0]" in err
    code, _, err = await opscore.run("runs", "get", str(uuid.uuid4()))
    assert (code, err.split(":")[:2]) == (1, ["opscore", " NOT_FOUND"])


async def test_connection_and_usage_errors(
    opscore: Opscore,
    server: OpsCoreServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stranger = Opscore(server.port, capsys, monkeypatch, token="not-a-token-the-server-knows")
    code, _, err = await stranger.run("agents", "list")
    assert (code, "UNAUTHENTICATED" in err) == (1, True)
    nowhere = Opscore(free_port(), capsys, monkeypatch)
    code, _, err = await nowhere.run("agents", "list")
    assert (code, "UNAVAILABLE" in err) == (1, True)
    # A list of addresses: the one where nothing listens is passed over.
    both = Opscore(server.port, capsys, monkeypatch)
    both.environment["OPSCORE_ADDRESS"] = f"127.0.0.1:{free_port()},127.0.0.1:{server.port}"
    assert (await both.json("agents", "list"))["agents"] == []

    code, _, err = await opscore.run("runs", "trigger", "flow", "--input", "[1]")
    assert (code, "a JSON object is needed" in err) == (2, True)
    deep = '{"a":' * 100 + "1" + "}" * 100  # JSON, but nested deeper than protobuf takes
    code, _, err = await opscore.run("runs", "trigger", "flow", "--input", deep)
    assert (code, "cannot be sent as a JSON object" in err) == (2, True)
    code, _, err = await opscore.run("runs", "list", "--page-size", str(2**40))
    assert (code, "--page-size" in err) == (2, True)
    code, _, err = await opscore.run("agents", "get", "a-1", "--token", "two\nlines")
    assert (code, "printable ASCII" in err) == (2, True)
    code, _, err = await opscore.run(
        "agents", "list", "--tls-client-cert", str(EXAMPLES / "fan-out.json")
    )
    assert (code, "needs its private key" in err) == (2, True)


async def test_a_watched_run_exits_0_when_it_succeeds(
    opscore: Opscore, client: helpers.Client, server: OpsCoreServer
) -> None:
    worker = await client.agent("w", capabilities=["work"])
    await opscore.json("definitions", "create", "-f", "-", stdin=FLOW)
    watching = await opscore.start(
        "runs", "trigger", "flow", "--input", '{"n": 1}', "--watch", "--output", "json"
    )
    for step in ("first", "second"):
        assignment = await worker.next_assignment(timeout=RUN_WAIT)
        assert assignment.task_name == step
        await worker.complete(assignment, {"done": step})
    code, out, err = await ended(watching)

    assert code == 0, err
    updates = [json.loads(line) for line in out.splitlines()]
    final = updates[-1]["run"]
    assert final["state"] == "RUN_STATE_SUCCEEDED"
    assert [(t["name"], t["state"], t["output"]) for t in final["tasks"]] == [
        ("first", "TASK_STATE_SUCCEEDED", {"done": "first"}),
        ("second", "TASK_STATE_SUCCEEDED", {"done": "second"}),
    ]
    assert all(update["run"]["state"] != "RUN_STATE_SUCCEEDED" for update in updates[:-1])


async def test_a_watched_run_exits_1_when_it_fails(
    opscore: Opscore, client: helpers.Client, server: OpsCoreServer
) -> None:
    worker = await client.agent("w", capabilities=["work"])
    await opscore.json("definitions", "create", "-f", "-", stdin=FLOW)
    run = await opscore.json("runs", "trigger", "flow")
    watching = await opscore.start("runs", "watch", run["run_id"])
    await worker.fail(await worker.next_assignment(timeout=RUN_WAIT), "broken")
    code, out, err = await ended(watching)

    assert code == 1, err
    assert "FAILED" in out
    assert "broken" in out
    assert "0/2 tasks" not in out  # the bar counts the failed and the skipped task as over
    assert "2/2 tasks" in out

    # Triggered and watched at once, failing the same way.
    watching = await opscore.start("runs", "trigger", "flow", "--watch")
    await worker.fail(await worker.next_assignment(timeout=RUN_WAIT), "broken again")
    code, out, err = await ended(watching)
    assert code == 1, err
    assert "broken again" in out


async def test_a_run_followed_live_on_a_terminal_and_as_json(
    opscore: Opscore,
    client: helpers.Client,
    server: OpsCoreServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = await client.agent("w", capabilities=["work"])
    await opscore.json("definitions", "create", "-f", "-", stdin=FLOW)
    run = await opscore.json("runs", "trigger", "flow")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws as on a terminal: redrawn live
    watching = asyncio.create_task(opscore.run("runs", "watch", run["run_id"]))
    for step in ("first", "second"):
        await worker.complete(await worker.next_assignment(), {"done": step})
    code, out, err = await watching
    assert code == 0, err
    assert "2/2 tasks" in out
    assert "SUCCEEDED" in out

    monkeypatch.delenv("TTY_COMPATIBLE")
    code, out, err = await opscore.run("runs", "watch", run["run_id"], "--output", "json")
    assert code == 0, err
    [line] = out.splitlines()  # a run already final is one update
    update = json.loads(line)
    assert update["run"]["state"] == "RUN_STATE_SUCCEEDED"
    assert [t["name"] for t in update["changed_tasks"]] == ["first", "second"]
