"""`Worker`: an Ops-Core agent made of handlers. It registers, holds its task stream (over a
list of addresses, reconnecting with backoff), runs each assignment's handler with bounded
concurrency, keeps the attempt's lease, reports the result until the server has it, and
drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from opscore.client._attempts import AttemptKey, Attempts
from opscore.client._backoff import Backoff
from opscore.client._calls import CALL_TIMEOUT, Calls, assignment_in
from opscore.client._channels import Channels, Tls
from opscore.client._context import Assignment, JsonObject, TaskContext
from opscore.client._errors import AttemptLost, NonRetryable, OutputRefused, Unreachable
from opscore.client._lease import Lease
from opscore.client._refusals import OpsCoreError, refusal
from opscore.domain.clock import Clock, SystemClock
from opscore.v1 import agent_pb2, workflow_pb2, workflow_service_pb2

log = logging.getLogger("opscore.client")

AsyncHandler = Callable[[TaskContext, JsonObject], Awaitable[JsonObject | None]]
"""A coroutine function that runs a task: its context and input in, its output out."""
SyncHandler = Callable[[TaskContext, JsonObject], JsonObject | None]
"""A plain function that runs a task, in the worker's thread pool."""
Handler = AsyncHandler | SyncHandler
H = TypeVar("H", bound=Callable[..., Any])

UNREGISTERED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
"""How the server refuses an agent it no longer knows by this token (deregistered, or its
token revoked): the worker registers again."""

TOKEN_ROTATED = "AGENT_TOKEN_ROTATED"
"""The reason the server gives for ending a stream because the agent registered again."""

UNANSWERED_HEARTBEATS = 2
"""Heartbeats in a row that go unanswered before the worker leaves the server for the next."""

FINAL_CALLS = 10.0
"""Seconds the calls after a drain (deregistration, hand-backs) may take together."""

STOPPED = "the worker stopped before the task finished"
"""The reason a drain gives the handlers it cancels, and the error of their hand-back."""


class _Unregistered(Exception):
    """The server refused the agent's token or id: register again."""


@dataclass
class _Held:
    """One attempt the worker holds: what it is, its context and lease, its asyncio task."""

    assignment: Assignment
    context: TaskContext
    lease: Lease
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def key(self) -> AttemptKey:
        return (self.assignment.task_id, self.assignment.attempt)


class Worker:
    """An agent of Ops-Core, made of task handlers.

        worker = Worker(["host1:50051", "host2:50051"], agent_id="summarizer-1", token=...)

        @worker.task("summarize")
        async def summarize(ctx: TaskContext, input: dict) -> dict: ...

        await worker.run()

    `addresses` are the servers (replicas) to use, tried in turn. `capabilities` are those the
    agent registers with: by default the names of its handlers (an assignment goes to the
    handler of its capability or, for a task without one, of its task name). `token` is what
    the agent registers with (a registration or operator token); the agent's own token, which
    registration returns, is used for every call after. `tls` gives the certificate files;
    without it the channels are plaintext. `max_concurrent_tasks` handlers run at once (the
    server sends no more). `drain_timeout` bounds how long a stopping worker waits for its
    handlers; `deregister_on_stop` makes it deregister as it exits, which hands back at once
    what it could not finish (a task pinned to the agent then fails, as no other agent may run
    it; without it, each unfinished attempt is failed as retryable). `extend_leases` keeps each
    attempt's lease while its handler runs. `clock` and `backoff` are for tests.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        agent_id: str,
        capabilities: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        max_concurrent_tasks: int = 1,
        token: str | None = None,
        tls: Tls | None = None,
        name: str = "",
        version: str = "",
        heartbeat_interval: float = 10.0,
        drain_timeout: float = 30.0,
        deregister_on_stop: bool = True,
        extend_leases: bool = True,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        if max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be at least 1")
        self.agent_id = agent_id
        self._addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        self._capabilities = None if capabilities is None else list(capabilities)
        self._labels = dict(labels or {})
        self._max_concurrent_tasks = max_concurrent_tasks
        self._token = token
        self._tls = tls
        self._name = name or agent_id
        self._version = version
        self._heartbeat_interval = heartbeat_interval
        self._drain_timeout = drain_timeout
        self._deregister_on_stop = deregister_on_stop
        self._extend_leases = extend_leases
        self._backoff = backoff or Backoff()
        self._clock: Clock = clock or SystemClock()
        self._handlers: dict[str, Handler] = {}
        self._attempts: Attempts[_Held] = Attempts()
        self._stopping = asyncio.Event()
        self._skew = timedelta(0)
        """The server's clock minus the worker's, from the latest heartbeat."""
        self._registered = False
        self._started = False

    # Handlers ------------------------------------------------------------------------------

    def task(self, name: str) -> Callable[[H], H]:
        """Decorate the handler of the tasks of capability `name` (or, for tasks without a
        capability, of task name `name`). A coroutine function runs on the worker's loop; a
        plain function runs in its thread pool. The handler takes the `TaskContext` and the
        input (a dict) and returns the output (a dict, or None for an empty one); an exception
        fails the attempt, retryably unless it is a `NonRetryable`."""

        def register(handler: H) -> H:
            if name in self._handlers:
                raise ValueError(f"a handler for {name!r} is registered already")
            self._handlers[name] = handler
            return handler

        return register

    @property
    def capabilities(self) -> list[str]:
        """The capabilities the agent registers with."""
        return list(self._handlers) if self._capabilities is None else list(self._capabilities)

    # Life ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin the drain: no new work, the attempts held finished (within `drain_timeout`)
        or handed back, then `run` returns. Call it on the worker's loop (`run` calls it on
        SIGTERM and SIGINT)."""
        self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Work until stopped: register, stream tasks and run them, reconnecting whenever the
        stream ends; on `stop` (or SIGTERM, SIGINT with `handle_signals`) drain and return.
        Raises the server's refusal (an `OpsCoreError`) when retrying cannot cure it: the
        registration refused (a token refused, an invalid field), or another process serving
        as this agent. A worker runs once."""
        if self._started:
            raise RuntimeError("a worker runs once: make another")
        self._started = True
        missing = [name for name in self.capabilities if name not in self._handlers]
        if missing:
            raise ValueError(f"no handler for the capabilities {missing}")
        self._channels = Channels(self._addresses, self._tls)  # reads the TLS files, or fails
        self._calls = Calls(self._channels, self.agent_id, self._token, self._backoff, self._clock)
        self._slots = asyncio.Semaphore(self._max_concurrent_tasks)
        self._executor = ThreadPoolExecutor(
            self._max_concurrent_tasks, thread_name_prefix=f"opscore-{self.agent_id}"
        )
        if handle_signals:
            _SIGNALLED.add(self)
        life = asyncio.create_task(self._life(), name=f"worker {self.agent_id}")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({life, stopping}, return_when=asyncio.FIRST_COMPLETED)
            _raise_if_refused(life)
            await self._drain(life)
        finally:
            for task in (life, stopping, *self._running()):
                task.cancel()
            await asyncio.gather(life, stopping, return_exceptions=True)
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self._channels.close()
            _SIGNALLED.discard(self)

    async def _life(self) -> None:
        await self._register()
        # A worker that stopped earlier left the agent BUSY, which registering keeps.
        await self._calls.report_state(agent_pb2.REPORTED_AGENT_STATE_IDLE)
        await self._stay_connected()

    async def _register(self) -> None:
        try:
            await self._calls.register(
                self.capabilities,
                self._labels,
                self._max_concurrent_tasks,
                self._name,
                self._version,
            )
        except grpc.aio.AioRpcError as error:
            log.error(
                "registration refused",
                extra={"agent_id": self.agent_id, "code": error.code().name},
            )
            raise
        self._registered = True
        log.info("agent registered", extra={"agent_id": self.agent_id})

    async def _stay_connected(self) -> None:
        """Hold a task stream, opening another (on the next address, after a backoff) whenever
        it ends or cannot be opened; register again if the server no longer knows the token."""
        failures = 0
        while True:
            try:
                opened = await self._session()
            except _Unregistered:
                log.warning("agent unknown to the server; registering again")
                await self._register()
                opened = False
            failures = 1 if opened else failures + 1
            self._channels.advance()
            await self._clock.sleep(self._backoff.delay(failures))

    async def _session(self) -> bool:
        """One task stream, from its opening to its end; whether it opened."""
        try:
            await self._heartbeat()  # the skew, before any lease is timed; and the token checked
        except Unreachable as error:
            log.info(
                "server unreachable", extra={"address": self._channels.address, "error": str(error)}
            )
            return False
        except grpc.aio.AioRpcError as error:
            if error.code() in UNREGISTERED:
                raise _Unregistered from error
            raise
        call = self._calls.stream()
        opened = asyncio.Event()
        reading = asyncio.create_task(self._read(call, opened))
        heartbeats = asyncio.create_task(self._heartbeats())
        try:
            await asyncio.wait({reading, heartbeats}, return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                reading.result()  # how the stream ended, if it says why (taken over, unknown)
            else:
                # The server stopped answering without closing the connection (frozen, or gone
                # behind a partition), which keepalive pings do not always notice.
                log.warning(
                    "server not answering heartbeats; reconnecting",
                    extra={"address": self._channels.address},
                )
        finally:
            for task in (reading, heartbeats):
                task.cancel()
            call.cancel()
            await asyncio.gather(reading, heartbeats, return_exceptions=True)
        return opened.is_set()

    async def _read(self, call: Any, opened: asyncio.Event) -> None:
        """Take the stream's events until it ends; `opened` is set once the server accepted it."""
        try:
            await call.initial_metadata()
            if not call.done():
                opened.set()
                log.info("task stream open", extra={"address": self._channels.address})
            async for event in call:
                self._take(event)
        except grpc.aio.AioRpcError as error:
            if _taken_over(error):
                # Another process serves as this agent. Registering back, or opening another
                # stream, would end its stream in turn, and the two would take turns for ever.
                log.error(
                    "another process took this agent over",
                    extra={"agent_id": self.agent_id, "code": error.code().name},
                )
                raise
            if error.code() in UNREGISTERED:
                raise _Unregistered from error
            log.info(
                "task stream ended",
                extra={"address": self._channels.address, "code": error.code().name},
            )

    async def _heartbeats(self) -> None:
        """Heartbeat every `heartbeat_interval` while the stream is open; return once
        `UNANSWERED_HEARTBEATS` in a row went unanswered."""
        unanswered = 0
        while unanswered < UNANSWERED_HEARTBEATS:
            await self._clock.sleep(self._heartbeat_interval)
            try:
                await self._heartbeat()
                unanswered = 0
            except Unreachable:
                unanswered += 1
            except grpc.aio.AioRpcError:
                unanswered = 0  # answered, if with a refusal: the stream says what it means

    async def _heartbeat(self) -> None:
        before = self._clock.now()
        # Late past the next one's time is unanswered: a server that froze is left sooner.
        server_time = await self._calls.heartbeat(min(CALL_TIMEOUT, self._heartbeat_interval))
        after = self._clock.now()
        self._skew = server_time - (before + (after - before) / 2)

    # Drain ---------------------------------------------------------------------------------

    async def _drain(self, life: asyncio.Task[None]) -> None:
        """Take no new work, let the handlers finish within `drain_timeout`, cancel the rest,
        close the stream, and deregister (or hand back what was not finished). Taken over by
        another process meanwhile, it cancels what it holds and raises that refusal instead."""
        log.info("worker draining", extra={"agent_id": self.agent_id, "held": len(self._attempts)})
        if not self._registered:
            return
        # BUSY rather than closing the stream: cancellations still reach the handlers. What
        # arrives before the server has it is run like the rest.
        busy = asyncio.create_task(self._calls.report_state(agent_pb2.REPORTED_AGENT_STATE_BUSY))
        try:
            async with asyncio.timeout(self._drain_timeout):
                while ((running := self._running()) or not busy.done()) and not life.done():
                    waiting = running if busy.done() else [*running, busy]
                    await asyncio.wait([*waiting, life], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.warning("drain timed out", extra={"held": len(self._attempts)})
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        unfinished = list(self._attempts)
        for held in unfinished:
            self._cancel(held, STOPPED)
        await asyncio.gather(*self._running(), return_exceptions=True)
        life.cancel()
        await asyncio.gather(life, return_exceptions=True)
        # Taken over while draining: the agent is the other process's now, not to deregister.
        _raise_if_refused(life)
        try:
            async with asyncio.timeout(FINAL_CALLS):
                if self._deregister_on_stop:
                    await self._calls.deregister()
                    log.info("agent deregistered", extra={"agent_id": self.agent_id})
                else:
                    for held in unfinished:
                        with contextlib.suppress(AttemptLost):
                            await self._calls.fail(held.key, STOPPED, retryable=True)
        except (TimeoutError, grpc.aio.AioRpcError, OpsCoreError) as error:
            log.warning("could not hand back the unfinished attempts", extra={"error": str(error)})

    # Attempts ------------------------------------------------------------------------------

    def _running(self) -> list[asyncio.Task[None]]:
        """The tasks of the attempts held."""
        return [held.task for held in self._attempts if held.task is not None]

    def _take(self, event: workflow_service_pb2.StreamTasksResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "assignment":
            self._assigned(assignment_in(event.assignment))
        elif kind == "cancellation":
            self._cancelled(event.cancellation)

    def _assigned(self, assignment: Assignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        fields = {"task_id": assignment.task_id, "attempt": assignment.attempt}
        running = self._attempts.get(key)
        if running is not None:
            running.lease.moved_to(assignment.deadline)
            log.info("attempt sent again, already running", extra=fields)
            return
        lease = Lease(
            assignment.deadline,
            functools.partial(self._calls.extend, key),
            self._clock,
            lambda: self._skew,
            self._backoff,
        )
        held = _Held(assignment, TaskContext(assignment, lease), lease)
        if not self._attempts.take(key, held):
            log.info("attempt sent again, already finished", extra=fields)
            return
        held.task = asyncio.create_task(self._work(held), name=f"task {key}")

    def _cancelled(self, cancellation: workflow_pb2.TaskCancellation) -> None:
        key = (cancellation.task_id, cancellation.attempt)
        held = self._attempts.get(key)
        log.info(
            "attempt cancelled",
            extra={"task_id": key[0], "attempt": key[1], "reason": cancellation.reason},
        )
        if held is None:
            self._attempts.finish(key)  # so that a copy still on its way is not run
            return
        self._cancel(held, cancellation.reason)

    def _cancel(self, held: _Held, reason: str) -> None:
        held.context._note_cancelled(reason)
        if held.task is not None:
            held.task.cancel()

    async def _work(self, held: _Held) -> None:
        """Run the attempt's handler (in a slot) and report its result, keeping its lease
        meanwhile; a cancellation of this task stops both."""
        keeper = asyncio.create_task(held.lease.keep()) if self._extend_leases else None
        if keeper is not None:
            keeper.add_done_callback(functools.partial(self._lease_ended, held))
        try:
            async with self._slots:
                await self._run_and_report(held)
        except AttemptLost as error:
            log.warning("attempt lost", extra={"task_id": held.key[0], "error": str(error)})
        except OpsCoreError as error:
            log.error(
                "result refused",
                extra={"task_id": held.key[0], "code": error.code.name, "error": error.message},
            )
        finally:
            if keeper is not None:
                keeper.cancel()
            self._attempts.finish(held.key)

    def _lease_ended(self, held: _Held, keeper: asyncio.Task[None]) -> None:
        if keeper.cancelled():
            return
        error = keeper.exception()
        if isinstance(error, AttemptLost):
            self._cancel(held, str(error))
        elif error is not None:
            log.error(
                "lease extension refused", extra={"task_id": held.key[0], "error": str(error)}
            )

    async def _run_and_report(self, held: _Held) -> None:
        assignment = held.assignment
        handler = self._handlers.get(assignment.capability) or self._handlers.get(
            assignment.task_name
        )
        if handler is None:
            missing = f"no handler for {assignment.capability or assignment.task_name!r}"
            await self._calls.fail(held.key, missing, retryable=False)
            return
        try:
            output = await self._call(handler, held.context, assignment.input)
        except NonRetryable as error:
            await self._calls.fail(held.key, _message(error), retryable=False)
            return
        # A handler's failure is its attempt's, reported, whatever it raised: SystemExit from a
        # library, or a CancelledError of its own (not the worker's cancellation of the attempt).
        except (Exception, SystemExit, KeyboardInterrupt, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and _cancelled_here():
                raise
            log.info("handler failed", extra={"task_id": held.key[0], "error": _message(error)})
            await self._calls.fail(held.key, _message(error), retryable=True)
            return
        if output is None:
            output = {}
        if not isinstance(output, dict):
            wrong = f"the handler returned {type(output).__name__}, not a dict"
            await self._calls.fail(held.key, wrong, retryable=False)
            return
        try:
            await self._calls.complete(held.key, output)
        except OutputRefused as error:
            await self._calls.fail(held.key, str(error), retryable=False)

    async def _call(self, handler: Handler, context: TaskContext, task_input: JsonObject) -> Any:
        if inspect.iscoroutinefunction(handler):
            return await handler(context, task_input)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(handler, context, task_input)
        )


def _cancelled_here() -> bool:
    """Whether the running task is being cancelled (by the worker: a cancellation, a drain)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _raise_if_refused(life: asyncio.Task[None]) -> None:
    """Raise the refusal that ended the worker's `life` (as an `OpsCoreError`), if it ended so:
    no retry cures it."""
    if not life.done() or life.cancelled():
        return
    error = life.exception()
    if isinstance(error, grpc.aio.AioRpcError):
        raise refusal(error) from error
    if error is not None:
        raise error


class _Signalled:
    """The workers of this process that stop on SIGTERM and SIGINT: one handler per signal
    stops them all (a second handler would replace the first)."""

    def __init__(self) -> None:
        self._workers: set[Worker] = set()

    def add(self, worker: Worker) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.add_signal_handler(signum, self._stop_all)
        self._workers.add(worker)

    def discard(self, worker: Worker) -> None:
        if worker not in self._workers:
            return
        self._workers.discard(worker)
        if not self._workers:
            loop = asyncio.get_running_loop()
            for signum in SIGNALS:
                loop.remove_signal_handler(signum)

    def _stop_all(self) -> None:
        for worker in self._workers:
            worker.stop()


SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that drain the workers of a process."""

_SIGNALLED = _Signalled()


def _message(error: BaseException) -> str:
    """What a failure says: the exception's message, or its type when it has none; for what
    is not an `Exception` (SystemExit, a CancelledError), which exception it was as well."""
    text = str(error)
    if isinstance(error, Exception):
        return text or type(error).__name__
    raised = f"the handler raised {type(error).__name__}"
    return f"{raised}: {text}" if text else raised


def _taken_over(error: grpc.aio.AioRpcError) -> bool:
    """Whether the server ended the task stream for another process serving as this agent: a
    newer stream replaced it, or a newer registration rotated its token."""
    if error.code() == grpc.StatusCode.ABORTED:
        return True
    return (
        error.code() == grpc.StatusCode.UNAUTHENTICATED and refusal(error).reason == TOKEN_ROTATED
    )
