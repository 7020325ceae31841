"""The server's life: check its address and TLS files, own its database, migrate, recover,
serve (the two services, health and reflection on one port, plaintext or over TLS: see
opscore/tls.py), and on a signal drain and stop. Background work (the writer, the dispatcher,
the TLS reload) runs as supervised tasks: if one fails, the failure is logged and the server
stops rather than limp on without it.

Health follows storage: every service turns NOT_SERVING while the database fails and SERVING
again when it works (see `StorageHealth`). Storage faults that come and go are waited out; one
that retrying cannot mend (`StorageLost`: a corrupt or dropped database, refused credentials)
stops the server with one CRITICAL line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypedDict

import grpc
from google.protobuf.internal import api_implementation
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from opscore.api import convert
from opscore.api.access import AccessInterceptor, Capacity
from opscore.api.agent_lifecycle import AgentLifecycleServicer
from opscore.api.errors import ErrorInterceptor
from opscore.api.workflow_service import WorkflowServiceServicer
from opscore.config import Settings
from opscore.domain.clock import Clock, SystemClock
from opscore.domain.credentials import AgentTokens
from opscore.domain.dispatch import AssignBatch, Dispatch, DispatchFactory
from opscore.domain.dispatcher import Dispatcher
from opscore.domain.engine import Engine
from opscore.domain.errors import StorageFault
from opscore.domain.health import StorageHealth
from opscore.domain.notices import Noticeboard
from opscore.domain.quotas import RateLimiter, Slots
from opscore.domain.shared_dispatcher import SharedDispatcher
from opscore.ports import refuse_taken
from opscore.startup import StartupError, failing_as
from opscore.store import migrate, ownership
from opscore.store.database import name_of, open_database
from opscore.store.notices import PostgresNoticeboard
from opscore.store.ownership import Holder, OwnershipLost
from opscore.store.queries import Store
from opscore.store.space import reserve_for
from opscore.store.writer import Writer
from opscore.tls import ServerTls, TlsFiles
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

log = logging.getLogger("opscore.server")


class DispatchParts(TypedDict, total=False):
    """The engine's dispatch and noticeboard, as `OpsCoreServer._dispatch` chooses them."""

    dispatch: DispatchFactory
    noticeboard: Noticeboard


SERVICE_NAMES = (
    agent_lifecycle_pb2.DESCRIPTOR.services_by_name["AgentLifecycle"].full_name,
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name,
)


class OpsCoreServer:
    """One running Ops-Core: `start`, then `wait` or `stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self.engine: Engine | None = None
        self._failed = asyncio.Event()
        self._resources = contextlib.AsyncExitStack()
        """How to undo what `start` took, pushed as it is taken: `_drain` (or a failed start)
        undoes it in reverse, the port first and the database's ownership last."""
        self._stopping: asyncio.Task[None] | None = None
        self._tls: ServerTls | None = None

    async def start(self) -> int:
        """Check the address, own the database, migrate, recover and start serving; returns the
        bound port. A start that fails undoes what it did, leaving the port and the database
        free; a failure the world causes (see opscore.startup) is a StartupError."""
        try:
            await self._start()
        except BaseException:
            await self._resources.aclose()
            raise
        return self.port

    async def _start(self) -> None:
        settings = self.settings
        resources = self._resources
        # Before anything else: an open server says so first, and a reachable one is refused.
        self._auth = settings.authentication()
        agent_tokens = AgentTokens()
        self.authority = self._auth.authority(settings.listen, agent_tokens)
        refuse_taken(settings.listen)  # before the database is touched
        tls = TlsFiles.chosen(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        self._tls = None if tls is None else ServerTls(tls)

        database = name_of(settings.db_url)
        with failing_as(f"cannot open the database {database}", database=database):
            # Held before anything writes: the migration, and the recovery that marks agents
            # disconnected.
            owned = await ownership.join(settings.db_url, Holder("serve", settings.listen))
            resources.push_async_callback(owned.release)
            self._storage = StorageHealth(settings.storage_failure_threshold)
            self._db = open_database(settings.db_url, self._storage)
            resources.push_async_callback(self._db.dispose)
            await self._migrate(owned)
            self._writer = Writer(self._db)
            store = Store(self._db, self._writer, settings.rules())
            clock = SystemClock()
            engine_settings = settings.engine()
            self.engine = Engine(
                store,
                engine_settings,
                admission=reserve_for(settings.db_url, settings.sqlite_free_space_reserve),
                encode=convert.stream_event,
                sizes=convert.WireSizes(),
                clock=clock,
                **self._dispatch(engine_settings.replicas.shared, store),
                agent_tokens=agent_tokens,
            )
            # Writes that make tasks ready or free slots place them before they commit.
            placement = store.placement(
                self.engine.dispatcher.reserve_for_commit, self.engine.assigned, clock.now
            )
            # Every batch ends by reading the runs being watched, for their watchers.
            watches = self.engine.watches
            observation = store.runs.observation(
                watches.run_ids, watches.known, self.engine.observed_runs
            )
            writer = self._supervise(self._writer.run(placement, observation), "writer")
            resources.push_async_callback(self._stop_writer, writer)
            await self.engine.recover()
            # Its agents are disconnected once no stream of its is left, before the writer ends.
            resources.push_async_callback(self.engine.membership.leave)
        self._storage.on_recovery(self.engine.storage_recovered)
        self._storage.on_lost(self._storage_lost)
        # The loops that write (and those beside them) stop before the writer, which then
        # commits what they submitted.
        loops = [
            self._supervise(owned.watch(), "database ownership"),
            self._supervise(self.engine.membership.run(), "replica lease"),
            self._supervise(self.engine.run_notices(), "replica notices"),
            self._supervise(self.engine.run_watch_rereads(), "run watches"),
            self._supervise(self.engine.dispatcher.run(), "dispatcher"),
            self._supervise(self.engine.run_timers(), "timers"),
            self._supervise(self._db.maintain(), "database upkeep"),
        ]
        resources.push_async_callback(_cancel, loops)

        self._listen(clock)
        await self._grpc.start()
        await self._publish_health(serving=True)
        # It probes storage through the writer: stopped before the writer is.
        watch = self._storage.watch(self._publish_health, store.probe)
        resources.push_async_callback(_cancel, [self._supervise(watch, "storage health")])
        self._log_started()

    def _dispatch(self, shared: bool, store: Store) -> DispatchParts:
        """How the engine dispatches: alone on its database, the whole queue in memory; as a
        replica, a bounded prefetch, claims, and notices to and from the other replicas."""
        if not shared:
            return {"dispatch": Dispatcher}
        noticeboard = PostgresNoticeboard(self.settings.db_url, lambda: store.shared.replica_id)

        def replica(assign: AssignBatch, *, clock: Clock) -> Dispatch:
            # Late-bound: the engine calls this while it is being built.
            return SharedDispatcher(
                assign,
                clock=clock,
                claim=lambda wants: self._engine().claim(wants),
                announce=lambda capabilities: self._engine().announce(capabilities),
            )

        return {"dispatch": replica, "noticeboard": noticeboard}

    def _engine(self) -> Engine:
        assert self.engine is not None  # built before anything is dispatched
        return self.engine

    async def _migrate(self, owned: ownership.Ownership) -> None:
        """Bring the schema to this build's, when no other replica runs on it; a replica that
        joins others must find it so (its migrations cannot run under them)."""
        if owned.alone:
            await migrate.upgrade(self._db)
        else:
            current, head = await migrate.revision_of(self._db), migrate.HEAD
            if current != head:
                raise StartupError(
                    f"cannot join the replicas on {name_of(self.settings.db_url)}",
                    f"the schema is at revision {current} and this build needs {head}; other "
                    "replicas are running on it: stop every replica, then start this one (it "
                    "migrates the schema) or run `opscore db upgrade`",
                    database=name_of(self.settings.db_url),
                )
        await owned.share()

    def _listen(self, clock: Clock) -> None:
        """The gRPC server: its interceptors, its port (TLS when configured) and its services."""
        settings = self.settings
        resources = self._resources
        assert self.engine is not None
        # Errors outside access: a refusal is mapped to its status like any domain error.
        access = AccessInterceptor(self.authority, self._capacity(clock))
        self._grpc = grpc.aio.server(
            interceptors=[ErrorInterceptor(), access],
            options=self._options(),
            maximum_concurrent_rpcs=self._backstop(),
        )
        resources.push_async_callback(self._grpc.stop, settings.shutdown_grace)
        try:
            self.port = self._bind(settings.listen)
        except RuntimeError as error:  # taken since it was checked, or no address at all
            raise StartupError(
                f"cannot listen on {settings.listen}", str(error), address=settings.listen
            ) from error
        if self._tls is not None:
            reloads = self._supervise(self._tls.watch(settings.tls_reload_interval), "tls reload")
            resources.push_async_callback(_cancel, [reloads])
        agent_lifecycle_pb2_grpc.add_AgentLifecycleServicer_to_server(
            AgentLifecycleServicer(self.engine), self._grpc
        )
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
            WorkflowServiceServicer(self.engine), self._grpc
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )

    def _log_started(self) -> None:
        protobuf = api_implementation.Type()
        log.info(
            "server started",
            extra={
                "listen": self.settings.listen,
                "port": self.port,
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "protobuf": protobuf,
            },
        )
        if protobuf != "upb":
            # upb parses and builds messages in C; protobuf's pure-Python runtime costs a large
            # share of the throughput, and nothing but the environment chooses it.
            log.warning(
                "protobuf runs its pure-Python implementation: expect about a third less "
                "throughput; unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION to use upb",
                extra={"protobuf": protobuf},
            )

    def _capacity(self, clock: Clock) -> Capacity:
        settings = self.settings
        return Capacity(
            streams=Slots(settings.max_streams),
            calls=Slots(settings.max_concurrent_calls),
            rates={
                "trigger": RateLimiter(settings.trigger_rate, clock),
                "register": RateLimiter(settings.register_rate, clock),
            },
        )

    def _backstop(self) -> int | None:
        """GRPC's own bound on calls at once, under the interceptor's limits (which answer with
        details): room for every stream and twice the unary calls, as calls refused by the
        interceptor hold a place too until they are answered."""
        settings = self.settings
        if not (settings.max_streams and settings.max_concurrent_calls):
            return None
        return settings.max_streams + 2 * settings.max_concurrent_calls

    def _bind(self, address: str) -> int:
        if self._tls is None:
            return self._grpc.add_insecure_port(address)
        return self._grpc.add_secure_port(address, self._tls.credentials)

    def reload(self) -> None:
        """Read the token files and the TLS files again, changed or not (SIGHUP): tokens added
        work at once and tokens removed stop; new connections get the certificates if they
        load, and nothing changes for connections already open (see opscore.tls)."""
        self._auth.reload(self.authority)
        if self._tls is not None:
            self._tls.reload(force=True)

    def _options(self) -> list[tuple[str, Any]]:
        settings = self.settings
        return [
            ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
            # Also what lets clients ping a connection with no call open (agents between
            # streams) as often as min_ping_interval: without it, gRPC counts any ping there
            # sooner than two hours after the last as a strike.
            ("grpc.keepalive_permit_without_calls", 1),
            # A client pinging sooner than this while the server sends it nothing gets a strike,
            # and one strike over the limit closes its connection (GOAWAY ENHANCE_YOUR_CALM).
            # grpc.http2.max_pings_without_data is not set: gRPC ignores it in servers, whose
            # own keepalive pings are never held back for want of data.
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(settings.min_ping_interval * 1000),
            ),
            ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
            # Clients queue their calls beyond it (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            # Count a connection's calls as its client does, open on the wire. By default gRPC
            # also counts calls that have ended but are not yet freed, and so refuses
            # (UNAVAILABLE) calls of a client that keeps to the limit as soon as it reaches it.
            ("grpc.http.overload_protection", 0),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # gRPC shares a port with any process that asks (SO_REUSEPORT), and the kernel then
            # splits the connections between them: a second server must fail to bind instead.
            ("grpc.so_reuseport", 0),
        ]

    async def _publish_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # Once draining, the health servicer keeps every service NOT_SERVING.
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    def _storage_lost(self, fault: StorageFault) -> None:
        if not self._failed.is_set():
            log.critical(
                "storage lost: the server stops",
                extra={"reason": fault.reason, "cause": fault.cause},
            )
            self._failed.set()

    def _supervise(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"opscore-{name}")

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled():
                return
            error = finished.exception()
            if isinstance(error, OwnershipLost):  # not a fault of the code: no traceback
                log.critical(f"stopping: {error}", extra={"task": name, "database": error.database})
                self._failed.set()
            elif error is not None:
                log.critical("background task failed", extra={"task": name}, exc_info=error)
                self._failed.set()

        task.add_done_callback(done)
        return task

    async def _stop_writer(self, writer: asyncio.Task[None]) -> None:
        """Let the writer commit what was submitted, and end."""
        self._writer.close()
        await asyncio.gather(writer, return_exceptions=True)

    async def settle(self) -> None:
        """Return at a moment the server has nothing left to do of itself: no write queued or
        running, no dispatch pass pending, no timer due (see `Engine.idle`). What it has sent
        by then is all that the requests so far lead to."""
        assert self.engine is not None
        while not (self._writer.idle and self.engine.idle):
            await self._writer.until_idle()
            await self.engine.until_idle()

    async def wait_for_failure(self) -> None:
        """Return when a background task has failed (the server must then stop)."""
        await self._failed.wait()

    @property
    def failed(self) -> bool:
        """Whether a background task has failed."""
        return self._failed.is_set()

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, streams end with UNAVAILABLE, in-flight calls finish
        within the grace, pending commits are written, then everything closes and the database
        is given up. Calling it again waits for the same drain.
        """
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._drain())
        await asyncio.shield(self._stopping)

    async def _drain(self) -> None:
        log.info("server stopping")
        await self._health.enter_graceful_shutdown()
        assert self.engine is not None
        self.engine.shut_down()
        await self._resources.aclose()
        log.info("server stopped")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: Settings) -> int:
    """Run a server until SIGINT/SIGTERM (exit status 0) or a background failure (1); SIGHUP
    reloads its TLS files."""
    server = OpsCoreServer(settings)
    await server.start()
    # What exists now (modules, the schema, the recovered queue) lives as long as the process:
    # out of the garbage collector's sight, a full collection scans only what serving creates
    # (full collections, the tail of the latency, become much shorter).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(server.wait_for_failure())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    await server.stop()
    return 1 if server.failed else 0
