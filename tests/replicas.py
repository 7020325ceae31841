"""Several `opscore serve` processes ("replicas") on one PostgreSQL database, and agents that
fail over from one replica to the next, as issue 25's tests need them; and two replicas in the
test's process, for suites written against one server (`two_replicas`).

    async with Replicas.on_fresh_database(3, tmp_path) as replicas:
        ledger = Ledger()
        agent = FailoverAgent("worker", replicas.addresses, ledger, first=1)
        async with agent:  # registered, streaming from replica 1, completing what it is sent
            ...
        replicas.kill(0)  # SIGKILL; replicas.restart(0) starts it again on its port

Each replica is a `ServerProcess` (tests/processes.py) on a port of its own, with the settings
of `REPLICA_SETTINGS` (short leases and grace, so that a replica's loss is seen in seconds) and
authentication on as everywhere in the suite (tests/auth.py). The database is a fresh one made by
conftest's `postgres_database`: empty, so the first replica to start migrates it (one first and
the rest once it serves, or all at once).

A `FailoverAgent` is what a real agent with a list of addresses does: it registers once, streams
from one address, and when that stream ends (UNAVAILABLE, ABORTED, connection refused) it opens
one on the next address after a short backoff; its agent token, learnt at registration, is
accepted by every replica. It completes every assignment at once with an output naming itself,
the task and the attempt, sending CompleteTask to the next replica when one does not answer, and
notes in a shared `Ledger` every assignment it received (and on which replica) and every
completion the server acknowledged, for the test to check that nothing was lost or done twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import asyncpg  # type: ignore[import-untyped]
import auth
import grpc
import pytest
from conftest import POSTGRES_URL, ServerFactory, asyncpg_dsn, postgres_database
from helpers import WAIT, Agent, Client, complete_request
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from processes import ServerProcess, free_port

from opscore.server import OpsCoreServer

LEASE = 2.0
"""Seconds of a replica's heartbeat lease (OPSCORE_REPLICA_LEASE): a replica killed is declared
dead by another within about this long."""

GRACE = 3.0
"""Seconds of an agent's grace (OPSCORE_AGENT_GRACE): from its stream's end (or its replica's
declared death), how long it keeps its attempts before they count as lost."""

REPLICA_SETTINGS = {
    "OPSCORE_REPLICA_LEASE": str(LEASE),
    "OPSCORE_AGENT_GRACE": str(GRACE),
    "OPSCORE_DEFAULT_TASK_TIMEOUT": "30",
    "OPSCORE_SHUTDOWN_GRACE": "2",
    "OPSCORE_LOG_FORMAT": "json",
    "OPSCORE_LOG_LEVEL": "DEBUG",
}
"""The environment of every replica: the shortest settings that keep the tests fast. DEBUG logs
each assignment and completion ("task assigned", "task completed"), which the tests count."""

CALL_TIMEOUT = 5.0
"""Deadline of each unary call an agent makes."""

COMPLETE_WAIT = 20.0
"""Seconds an agent keeps sending one completion to replica after replica before giving up."""

BACKOFF = 0.05
"""Seconds an agent waits before it tries the next address."""

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
"""A channel to a replica that was restarted finds it again soon."""

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""How a call to a replica that died or is draining may fail: its outcome is unknown, and the
same call goes to another replica."""

RECONNECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
"""How a task stream may end when its replica dies, drains or loses it to a newer stream (or
gives it up, declared dead): the agent opens one on the next address."""


class Replicas:
    """`count` `opscore serve` processes on the PostgreSQL database `url`, each on a port of its
    own, logging to `replica-<i>.log` in `directory`. As an async context manager they are
    started on entry and killed (those still alive) on exit."""

    def __init__(
        self, url: str, count: int, directory: Path, *, together: bool = False, **settings: str
    ) -> None:
        """`together`: start them all at once (else the first, then the rest once it serves);
        `settings` are OPSCORE_* variables over `REPLICA_SETTINGS`."""
        self.url = url
        self.together = together
        self.servers = [
            ServerProcess.on_url(
                url,
                free_port(),
                directory / f"replica-{index}.log",
                directory,
                **{**REPLICA_SETTINGS, **settings},
            )
            for index in range(count)
        ]

    @classmethod
    @contextlib.asynccontextmanager
    async def on_fresh_database(
        cls, count: int, directory: Path, *, together: bool = False, **settings: str
    ) -> AsyncIterator[Replicas]:
        """`count` replicas started on a new, empty PostgreSQL database (dropped afterwards)."""
        async with (
            postgres_database() as url,
            cls(url, count, directory, together=together, **settings) as replicas,
        ):
            yield replicas

    @property
    def addresses(self) -> list[str]:
        """Each replica's address, in order."""
        return [f"127.0.0.1:{server.port}" for server in self.servers]

    def live(self) -> list[int]:
        """The indexes of the replicas whose process runs."""
        return [i for i, server in enumerate(self.servers) if server.returncode is None]

    async def start(self) -> None:
        """Start every replica and wait until each serves (see `together`)."""
        first, *rest = self.servers
        if self.together:
            await asyncio.gather(*(server.start() for server in self.servers))
        else:
            await first.start()
            await asyncio.gather(*(server.start() for server in rest))

    def kill(self, index: int) -> None:
        """SIGKILL replica `index`."""
        self.servers[index].kill()

    def terminate(self, index: int) -> None:
        """SIGTERM replica `index`: it drains and exits."""
        self.servers[index].terminate()

    async def restart(self, index: int) -> ServerProcess:
        """Start replica `index` again (it must have exited): a new process on the same port,
        database, settings and log file. Returns it once it serves."""
        old = self.servers[index]
        assert old.returncode is not None, f"replica {index} still runs"
        new = ServerProcess(
            old.args, port=old.port, log=old.log, cwd=old.cwd, environment=old.environment
        )
        self.servers[index] = new
        await new.start()
        return new

    async def close(self) -> None:
        """Kill every replica still alive and wait until each is gone."""
        await asyncio.gather(*(server.close() for server in self.servers))

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON records of every replica's log, over all its lives (a killed one may have
        left its last line cut: such a line is passed over)."""
        return [record for server in self.servers for record in server.log_records(strict=False)]

    def log_texts(self) -> str:
        """Every replica's log, for a failing test's message."""
        return "\n".join(
            f"--- replica {i}:\n{server.log_text()}" for i, server in enumerate(self.servers)
        )

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one statement, run on a connection of the test's own to the database."""
        connection = await asyncpg.connect(asyncpg_dsn(self.url))
        try:
            return list(await connection.fetch(sql, *args))
        finally:
            await connection.close()

    async def task_rows(self, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored rows of the runs' tasks by task_id: state, attempt, agent_id, and output
        (decoded)."""
        rows = await self.query(
            "SELECT task_id, run_id, state, attempt, agent_id, output FROM tasks"
            " WHERE run_id = ANY($1::text[])",
            list(run_ids),
        )
        found: dict[str, dict[str, Any]] = {}
        for row in rows:
            values = dict(row)
            if isinstance(values["output"], str):
                values["output"] = json.loads(values["output"])
            found[values["task_id"]] = values
        return found

    @contextlib.asynccontextmanager
    async def operators(self) -> AsyncIterator[list[Client]]:
        """A Client on each replica, for the operator's calls (its channel finds a restarted
        replica again within a few hundred milliseconds; a call sooner is UNAVAILABLE)."""
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for address in self.addresses:
                channel = auth.channel(address, options=CHANNEL_OPTIONS)
                await stack.enter_async_context(channel)
                clients.append(Client(channel))
                stack.push_async_callback(clients[-1].close)
            yield clients

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


# Agents --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """An assignment an agent read on its stream from replica `replica`."""

    agent_id: str
    replica: int
    assignment: workflow_pb2.TaskAssignment


@dataclass(frozen=True)
class Acknowledged:
    """A CompleteTask replica `replica` answered OK."""

    agent_id: str
    replica: int
    task_id: str
    attempt: int
    output: dict[str, Any]


@dataclass
class Ledger:
    """What the agents of a test received and had acknowledged, and anything a correct
    deployment never causes."""

    received: list[Received] = field(default_factory=list)
    acknowledged: list[Acknowledged] = field(default_factory=list)
    refused: list[tuple[str, str, int, str]] = field(default_factory=list)
    """(agent_id, task_id, attempt, status) of completions the server refused."""
    unexpected: list[str] = field(default_factory=list)
    failed_connects: int = 0
    """Task streams that could not be opened (the address was dead, or refused it)."""
    resent: int = 0
    """Completions sent to another replica after one gave no answer."""

    def holders(self) -> dict[tuple[str, int], set[str]]:
        """(task_id, attempt) -> the agents that received that attempt."""
        found: dict[tuple[str, int], set[str]] = defaultdict(set)
        for seen in self.received:
            found[seen.assignment.task_id, seen.assignment.attempt].add(seen.agent_id)
        return found

    def double_claims(self) -> dict[tuple[str, int], set[str]]:
        """Attempts assigned to more than one agent (there must be none)."""
        return {key: agents for key, agents in self.holders().items() if len(agents) > 1}

    def unmarked_repeats(self) -> list[Received]:
        """Assignments an agent received again without `redelivered` (there must be none)."""
        seen: set[tuple[str, str, int]] = set()
        repeats: list[Received] = []
        for received in self.received:
            key = (received.agent_id, received.assignment.task_id, received.assignment.attempt)
            if key in seen and not received.assignment.redelivered:
                repeats.append(received)
            seen.add(key)
        return repeats

    def acknowledgements(self) -> dict[tuple[str, int], list[Acknowledged]]:
        """(task_id, attempt) -> the completions of it acknowledged."""
        found: dict[tuple[str, int], list[Acknowledged]] = defaultdict(list)
        for done in self.acknowledged:
            found[done.task_id, done.attempt].append(done)
        return found


class ReplicaStream(Agent):
    """A task stream of helpers.Agent that counts as open once the server sent its headers (it
    sends them as soon as the stream is installed; a refusal is a status without any). The
    helpers' own `connect` polls GetAgent for `connected`, which across replicas may still be
    true of the agent's stream on a replica that died."""

    async def connect(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """Open the stream; raise its error if it is refused (or ends at once)."""
        self.stream_ended.clear()
        self.received = 0
        call = self.client.workflows.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id=self.agent_id), metadata=metadata
        )
        self._call = call
        self._reader = asyncio.create_task(self._read(call))
        async with asyncio.timeout(WAIT):
            await call.initial_metadata()
        if call.done():
            await self._reader
            if self.stream_error is not None:
                raise self.stream_error
            raise ConnectionError(f"{self.agent_id}: the stream ended as it opened")

    def end_code(self) -> grpc.StatusCode | None:
        """The status the stream ended with (None: cancelled from this side, or still open)."""
        return None if self.stream_error is None else self.stream_error.code()


class FailoverAgent:
    """An agent with a list of replica addresses: see the module's docstring.

    It starts at `addresses[first]` and moves on to the next address (round the list) whenever
    its stream ends or cannot be opened. `hold()` makes it keep the assignments it receives in
    `held` instead of completing them; `stay_away()` stops it from opening a new stream until
    `come_back()`. As an async context manager it registers and starts working on entry, and
    stops (closing its channels) on exit.
    """

    def __init__(
        self,
        agent_id: str,
        addresses: Sequence[str],
        ledger: Ledger,
        *,
        capabilities: Iterable[str] = (),
        slots: int = 1,
        first: int = 0,
        report_elsewhere: bool = False,
    ) -> None:
        """`report_elsewhere`: send each CompleteTask first to the replica after the one the
        assignment came from (any replica takes it), not to that one."""
        self.agent_id = agent_id
        self.addresses = list(addresses)
        self.ledger = ledger
        self.capabilities = list(capabilities)
        self.slots = slots
        self.current = first
        """The address it streams from, or tries next."""
        self.report_elsewhere = report_elsewhere
        self.wallet = auth.Wallet()
        """Shared by its channels: the token of its registration on one replica goes to all."""
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._clients: dict[int, Client] = {}
        self.streams: list[tuple[int, ReplicaStream]] = []
        """Each task stream it opened, with the index of its replica, in order."""
        self.connected = asyncio.Event()
        """Set while a stream is open."""
        self.may_connect = asyncio.Event()
        self.may_connect.set()
        self.holding = False
        self.held: list[tuple[int, workflow_pb2.TaskAssignment]] = []
        """Assignments kept (while holding), with the replica each came from."""
        self.received: list[Received] = []
        """The assignments it received (its share of the ledger's)."""
        self._read = 0
        """How many of them `next_received` returned."""
        self.arrived = asyncio.Event()
        """Set whenever an assignment arrives (cleared by whoever waits for the next)."""
        self._started: set[tuple[str, int]] = set()
        """(task_id, attempt) it has begun to complete: a redelivered copy is not sent again."""
        self._calls: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    def client(self, index: int) -> Client:
        """A Client on the channel to `addresses[index]` (opened on first use)."""
        if index not in self._clients:
            channel = grpc.aio.insecure_channel(
                self.addresses[index],
                interceptors=auth.interceptors(self.wallet),
                options=CHANNEL_OPTIONS,
            )
            self._channels[index] = channel
            self._clients[index] = Client(channel)
        return self._clients[index]

    async def register(self) -> None:
        """RegisterAgent on the first address (its token is then good on every replica)."""
        await self.client(self.current).lifecycle.RegisterAgent(
            agent_lifecycle_pb2.RegisterAgentRequest(
                agent_id=self.agent_id,
                name=self.agent_id,
                version="1.0",
                capabilities=self.capabilities,
                max_concurrent_tasks=self.slots,
            ),
            timeout=CALL_TIMEOUT,
        )

    def start(self) -> None:
        """Start working: stream, complete, fail over, until `stop`."""
        self._runner = asyncio.create_task(self._run(), name=f"agent {self.agent_id}")

    def check(self) -> None:
        """Fail the test with the error of the agent's work if it stopped (it runs until
        stopped)."""
        if self._runner is not None and self._runner.done():
            self._runner.result()
            raise AssertionError(f"{self.agent_id} stopped working")

    async def wait_connected(self, timeout: float = WAIT, *, elsewhere_than: int = -1) -> int:
        """Wait (bounded) until a stream is open (on another replica than `elsewhere_than`, if
        given: the agent may not have seen its stream there end yet); its replica's index."""
        async with asyncio.timeout(timeout):
            while not (self.connected.is_set() and self.streams[-1][0] != elsewhere_than):
                await asyncio.sleep(0.01)
        return self.streams[-1][0]

    async def next_received(self, timeout: float = WAIT) -> Received:
        """The next assignment this agent received that no earlier call returned, waiting
        (bounded) for it to arrive."""
        async with asyncio.timeout(timeout):
            while self._read == len(self.received):
                self.arrived.clear()
                await self.arrived.wait()
        self._read += 1
        return self.received[self._read - 1]

    def hold(self) -> None:
        """Keep assignments from now on, instead of completing them."""
        self.holding = True

    async def complete_held(self) -> None:
        """Complete every assignment held (and stop holding); waits for the acknowledgements."""
        self.holding = False
        held, self.held = self.held, []
        calls = [self._start_completing(replica, assignment) for replica, assignment in held]
        if calls:
            await asyncio.wait(calls)

    async def fail(
        self, assignment: workflow_pb2.TaskAssignment, error: str, *, to: int, retryable: bool
    ) -> None:
        """Send FailTask for an assignment (held, or not yet completed) to replica `to`; it is no
        longer held."""
        self.held = [(r, held) for r, held in self.held if held != assignment]
        self._started.add((assignment.task_id, assignment.attempt))
        await self.client(to).workflows.FailTask(
            workflow_service_pb2.FailTaskRequest(
                task_id=assignment.task_id,
                agent_id=self.agent_id,
                attempt=assignment.attempt,
                error=error,
                retryable=retryable,
            ),
            timeout=CALL_TIMEOUT,
        )

    def stay_away(self) -> None:
        """Open no new stream until `come_back` (an open one is left alone)."""
        self.may_connect.clear()

    def come_back(self) -> None:
        """Open streams again."""
        self.may_connect.set()

    async def stop(self) -> None:
        """Stop working, wait for the completions under way, close the channels."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for call in list(self._calls):
            call.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> Self:
        await self.register()
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # The work ---------------------------------------------------------------------------------

    def _next(self) -> None:
        self.current = (self.current + 1) % len(self.addresses)

    async def _run(self) -> None:
        while True:
            stream = await self._open()
            replica = self.current
            self.streams.append((replica, stream))
            self.connected.set()
            try:
                await self._work(replica, stream)
            finally:
                self.connected.clear()
                await stream.disconnect()
            code = stream.end_code()
            if code not in RECONNECT:
                self.ledger.unexpected.append(
                    f"{self.agent_id}: the stream on replica {replica} ended with {code}"
                )
            self._next()
            await asyncio.sleep(BACKOFF)

    async def _open(self) -> ReplicaStream:
        """A stream open on the current address or, failing that, the next ones in turn."""
        while True:
            await self.may_connect.wait()
            stream = ReplicaStream(self.client(self.current), self.agent_id)
            try:
                await stream.connect()
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError) as error:
                await stream.disconnect()
                self.ledger.failed_connects += 1
                code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
                if code is not None and code not in RECONNECT:
                    self.ledger.unexpected.append(
                        f"{self.agent_id}: StreamTasks on replica {self.current}: {code.name}:"
                        f" {error.details() if isinstance(error, grpc.aio.AioRpcError) else ''}"
                    )
                self._next()
                await asyncio.sleep(BACKOFF)
                continue
            return stream

    async def _work(self, replica: int, stream: ReplicaStream) -> None:
        """Take each event of the stream until it ends (then those it had already read)."""
        while True:
            getting = asyncio.ensure_future(stream.events.get())
            ending = asyncio.ensure_future(stream.stream_ended.wait())
            try:
                await asyncio.wait({getting, ending}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ending.cancel()
                if not getting.done():
                    getting.cancel()
            if getting.done() and not getting.cancelled():
                self._take(replica, getting.result())
                continue
            while not stream.events.empty():
                self._take(replica, stream.events.get_nowait())
            return

    def _take(self, replica: int, event: workflow_service_pb2.StreamTasksResponse) -> None:
        if event.WhichOneof("event") != "assignment":
            self.ledger.unexpected.append(f"{self.agent_id} got {event}")
            return
        assignment = event.assignment
        received = Received(self.agent_id, replica, assignment)
        self.ledger.received.append(received)
        self.received.append(received)
        self.arrived.set()
        if self.holding:
            self.held.append((replica, assignment))
        else:
            self._start_completing(replica, assignment)

    def _start_completing(
        self, replica: int, assignment: workflow_pb2.TaskAssignment
    ) -> asyncio.Task[None]:
        call = asyncio.create_task(self._complete(replica, assignment))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return call

    async def _complete(self, replica: int, assignment: workflow_pb2.TaskAssignment) -> None:
        """CompleteTask, to replica after replica until one answers (or COMPLETE_WAIT passes).
        An attempt already begun (received again, redelivered) is not sent again: the call
        under way for it keeps trying."""
        key = (assignment.task_id, assignment.attempt)
        if key in self._started:
            return
        self._started.add(key)
        output = {
            "agent_id": self.agent_id,
            "task_id": assignment.task_id,
            "attempt": assignment.attempt,
        }
        request = complete_request(assignment, self.agent_id, output=output)
        index = (replica + 1) % len(self.addresses) if self.report_elsewhere else replica
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPLETE_WAIT
        while True:
            try:
                await self.client(index).workflows.CompleteTask(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code not in RETRYABLE:
                    self.ledger.refused.append(
                        (self.agent_id, assignment.task_id, assignment.attempt, code.name)
                    )
                    if code != grpc.StatusCode.FAILED_PRECONDITION:
                        self.ledger.unexpected.append(
                            f"{self.agent_id}: CompleteTask on replica {index}: {code.name}:"
                            f" {error.details()}"
                        )
                    return
                if loop.time() > deadline:
                    self.ledger.unexpected.append(
                        f"{self.agent_id}: no replica took the completion of {key}: {code.name}"
                    )
                    return
                self.ledger.resent += 1
                index = (index + 1) % len(self.addresses)
                await asyncio.sleep(BACKOFF)
            else:
                self.ledger.acknowledged.append(
                    Acknowledged(
                        self.agent_id, index, assignment.task_id, assignment.attempt, output
                    )
                )
                return


@contextlib.asynccontextmanager
async def working(agents: Sequence[FailoverAgent]) -> AsyncIterator[Sequence[FailoverAgent]]:
    """Register and start every agent (all at once), and stop them all on exit."""
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(agent.register() for agent in agents))
        for agent in agents:
            stack.push_async_callback(agent.stop)
            agent.start()
        await asyncio.gather(*(agent.wait_connected() for agent in agents))
        yield agents


async def agent_on(client: Client, agent_id: str) -> agent_pb2.Agent:
    """The agent as the replica `client` talks to sees it."""
    response = await client.lifecycle.GetAgent(
        agent_lifecycle_pb2.GetAgentRequest(agent_id=agent_id), timeout=CALL_TIMEOUT
    )
    return response.agent


def check_agents(agents: Iterable[FailoverAgent]) -> None:
    """Fail the test with the error of any agent that stopped working."""
    for agent in agents:
        agent.check()


def log_counts(records: Iterable[dict[str, Any]]) -> tuple[Counter[str], Counter[tuple[str, int]]]:
    """From replicas' log records: how many times each task was logged completed, and each
    (task_id, attempt) logged assigned."""
    completed: Counter[str] = Counter()
    assigned: Counter[tuple[str, int]] = Counter()
    for record in records:
        if record.get("event") == "task completed":
            completed[str(record.get("task_id"))] += 1
        elif record.get("event") == "task assigned":
            assigned[str(record.get("task_id")), int(record.get("attempt", 0))] += 1
    return completed, assigned


# Two replicas in the test's process ---------------------------------------------------------


DEPLOYMENTS = [
    "one server",
    pytest.param(
        "two replicas",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set"),
    ),
]
"""The parameters of a fixture that runs a suite against one server and, with PostgreSQL,
against two replicas (`two_replicas`)."""


class SplitClient(Client):
    """A Client of a two-replica deployment: its agents register, stream and report their state
    on one replica (`streams`), every other call (definitions, runs, results, leases) goes to
    the other (`calls`). So each assignment crosses from the replica that made the task ready
    to the one that holds the agent's stream, and each result, cancellation and timer from the
    replica that records it to that stream. Its `server` is the replica of the streams (what
    `expect_quiet` asks whether its streams are caught up)."""

    def __init__(
        self,
        calls: grpc.aio.Channel,
        streams: grpc.aio.Channel,
        calls_server: OpsCoreServer,
        streams_server: OpsCoreServer,
    ) -> None:
        super().__init__(calls, streams_server)
        self.lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(streams)
        self.workflows.StreamTasks = workflow_service_pb2_grpc.WorkflowServiceStub(
            streams
        ).StreamTasks
        self.replicas = (calls_server, streams_server)

    async def settle(self) -> None:
        """Return once both replicas have settled in one pass (each idle after the other)."""
        for _ in range(10):
            for replica in self.replicas:
                await replica.settle()
            if all(replica.engine is not None and replica.engine.idle for replica in self.replicas):
                return
        raise AssertionError("the replicas never settled together")


async def settle_replicas(client: Client) -> None:
    """Let every replica of a two-replica deployment settle (nothing for one server: the
    helpers' `expect_quiet` settles it)."""
    if isinstance(client, SplitClient):
        await client.settle()


@contextlib.asynccontextmanager
async def two_replicas(
    start_server: ServerFactory, url: str, **overrides: object
) -> AsyncIterator[SplitClient]:
    """Two servers in the test's process on the (migrated) PostgreSQL database `url`, each with
    conftest's settings and `overrides`, and a SplitClient on them (calls to the first, agents'
    streams on the second), which shares the agents' tokens between its two channels."""
    async with start_server(url, **overrides) as first, start_server(url, **overrides) as second:
        wallet = auth.Wallet()
        async with (
            grpc.aio.insecure_channel(
                f"127.0.0.1:{first.port}", interceptors=auth.interceptors(wallet)
            ) as calls,
            grpc.aio.insecure_channel(
                f"127.0.0.1:{second.port}", interceptors=auth.interceptors(wallet)
            ) as streams,
        ):
            client = SplitClient(calls, streams, first, second)
            try:
                yield client
            finally:
                await client.close()
