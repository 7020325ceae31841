/**
 * The agent's life: register, hold the task stream, run each assignment (keeping its lease) and
 * report its result, stop an attempt the server cancels or no longer counts as the agent's,
 * reconnect (over the list of addresses, with backoff) when the stream ends, and on a signal
 * finish the tasks in hand before closing.
 */

import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import {
  bearer,
  callOptions,
  type Connection,
  Connections,
  isServiceError,
  TRANSIENT,
  unary,
  worthRetrying,
} from './api';
import type { AgentConfig } from './config';
import type { Timestamp__Output } from './generated/google/protobuf/Timestamp';
import type { CompleteTaskResponse__Output } from './generated/opscore/v1/CompleteTaskResponse';
import type {
  ExtendTaskLeaseResponse__Output,
} from './generated/opscore/v1/ExtendTaskLeaseResponse';
import type { FailTaskResponse__Output } from './generated/opscore/v1/FailTaskResponse';
import type { RegisterAgentResponse__Output } from './generated/opscore/v1/RegisterAgentResponse';
import type { StreamTasksResponse__Output } from './generated/opscore/v1/StreamTasksResponse';
import type { TaskAssignment__Output } from './generated/opscore/v1/TaskAssignment';
import type { TaskCancellation__Output } from './generated/opscore/v1/TaskCancellation';
import { type JsonObject, toStruct } from './json';
import { AttemptLost, Lease } from './lease';
import * as log from './log';
import { work } from './work';

/** How one connection ended: reconnect (after a stream that opened, or not), or exit. */
type Outcome = { readonly reconnect: true; readonly opened: boolean } | { readonly exit: number };

/** The addresses, in turn, for ever (the configuration has at least one). */
function* rotation(addresses: readonly string[]): Generator<string> {
  for (;;) {
    yield* addresses;
  }
}

function packageVersion(): string {
  const manifest: unknown = JSON.parse(
    readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8'),
  );
  const known = typeof manifest === 'object' && manifest !== null && 'version' in manifest;
  return known && typeof manifest.version === 'string' ? manifest.version : '';
}

/** A deadline in milliseconds since the epoch; Infinity for none. */
function millis(deadline: Timestamp__Output | null): number {
  return deadline === null ? Infinity : Number(deadline.seconds) * 1000 + deadline.nanos / 1e6;
}

/** An attempt in hand: aborting `controller` stops its work; `lease` is its deadline, kept. */
interface Held {
  readonly controller: AbortController;
  readonly lease: Lease;
}

function statusFields(error: unknown): log.Fields {
  return isServiceError(error)
    ? { code: grpc.status[error.code], details: error.details }
    : { error: String(error) };
}

/** One agent process: `run` serves until the agent stops, `stop` asks it to. */
export class Agent {
  /** The agent token of the latest registration; its calls carry it. */
  private token = '';
  private registered = false;
  /** The connection of the latest task stream that opened: reports go there. */
  private connection: Connection | undefined;
  private stream: grpc.ClientReadableStream<StreamTasksResponse__Output> | undefined;
  private readonly stopping = new AbortController();
  /** The attempts in hand, by task id and attempt. */
  private readonly attempts = new Map<string, Held>();
  /** The work and report of each attempt in hand, which a stopping agent waits for. */
  private readonly running = new Set<Promise<void>>();

  constructor(
    private readonly config: AgentConfig,
    private readonly connections: Connections,
  ) {}

  /** Serve until stopped, deregistered, or refused for good; the exit status. */
  async run(): Promise<number> {
    let status = 0;
    let failures = 0;
    for (const address of rotation(this.config.addresses)) {
      const outcome = await this.serve(this.connections.to(address));
      if ('exit' in outcome) {
        status = outcome.exit;
        break;
      }
      if (this.stopping.signal.aborted) {
        break;
      }
      failures = outcome.opened ? 0 : failures + 1;
      const ceiling = Math.min(this.config.reconnectMaxMs, this.config.reconnectMs * 2 ** failures);
      // Jitter: the agents that lost one server do not all come back to the next at once.
      const delay = ceiling / 2 + (Math.random() * ceiling) / 2;
      try {
        await sleep(delay, undefined, { signal: this.stopping.signal });
      } catch {
        break;
      }
    }
    await this.drain();
    return status;
  }

  /** Stop: the stream closes and the tasks in hand finish; a second call abandons them. */
  stop(): void {
    if (this.stopping.signal.aborted) {
      this.abandon();
      return;
    }
    log.info('stopping', { tasks: this.running.size });
    this.stopping.abort();
    this.stream?.cancel();
  }

  /** Register if needed, then hold the task stream on `connection` until it ends. */
  private async serve(connection: Connection): Promise<Outcome> {
    if (!this.registered) {
      try {
        await this.register(connection);
      } catch (error) {
        if (isServiceError(error) && TRANSIENT.has(error.code)) {
          log.warning('registration failed', {
            address: connection.address,
            ...statusFields(error),
          });
          return { reconnect: true, opened: false };
        }
        log.error('registration refused', { address: connection.address, ...statusFields(error) });
        return { exit: 1 };
      }
    }
    if (this.stopping.signal.aborted) {
      return { exit: 0 };
    }
    const { status, opened } = await this.listen(connection);
    if (this.stopping.signal.aborted) {
      return { exit: 0 };
    }
    const fields = {
      address: connection.address,
      code: grpc.status[status.code],
      details: status.details,
    };
    switch (status.code) {
      case grpc.status.OK:
        // The server ends a stream without an error only when its agent is deregistered.
        log.info('deregistered by the server', fields);
        return { exit: 0 };
      case grpc.status.UNAUTHENTICATED:
        if (opened) {
          // The token was rotated under an open stream: another process registered as this
          // agent. Registering back would revoke its token in turn, and so on for ever.
          log.error('another registration of this agent revoked its token', fields);
          return { exit: 1 };
        }
        log.warning('task stream refused; registering again', fields);
        this.registered = false;
        return { reconnect: true, opened };
      case grpc.status.NOT_FOUND:
        // The server no longer knows the agent (a new database, say): it registers anew.
        log.warning('agent unknown to the server; registering again', fields);
        this.registered = false;
        return { reconnect: true, opened };
      case grpc.status.ABORTED:
        // Another process opened a stream as this agent; taking it back would start a fight.
        log.error('another task stream for this agent replaced this one', fields);
        return { exit: 1 };
      case grpc.status.PERMISSION_DENIED:
      case grpc.status.INVALID_ARGUMENT:
        log.error('task stream refused', fields);
        return { exit: 1 };
      default:
        log.warning(opened ? 'task stream ended' : 'task stream not opened', fields);
        return { reconnect: true, opened };
    }
  }

  private async register(connection: Connection): Promise<void> {
    const response = await unary<RegisterAgentResponse__Output>((callback) =>
      connection.lifecycle.RegisterAgent(
        {
          agentId: this.config.agentId,
          name: 'Ops-Core Node.js agent',
          version: packageVersion(),
          capabilities: [...this.config.capabilities],
          maxConcurrentTasks: this.config.maxConcurrentTasks,
        },
        bearer(this.config.registrationToken),
        callOptions(),
        callback,
      ),
    );
    this.token = response.agentToken;
    this.registered = true;
    log.info('registered', {
      address: connection.address,
      agent_id: this.config.agentId,
      capabilities: this.config.capabilities,
    });
  }

  /** Open the task stream and take its events until it ends; how it ended, and whether it had
   * opened (the server sends its headers at once when it accepts a stream). */
  private listen(connection: Connection): Promise<{ status: grpc.StatusObject; opened: boolean }> {
    return new Promise((resolve) => {
      let opened = false;
      const call = connection.workflows.StreamTasks(
        { agentId: this.config.agentId },
        bearer(this.token),
      );
      this.stream = call;
      call.on('metadata', () => {
        opened = true;
        this.connection = connection;
        log.info('task stream open', { address: connection.address });
      });
      call.on('data', (event) => this.receive(event, connection));
      // Every end, an error included, is followed by its status, which is where it is handled.
      call.on('error', () => undefined);
      call.on('status', (status) => {
        this.stream = undefined;
        resolve({ status, opened });
      });
    });
  }

  private receive(event: StreamTasksResponse__Output, connection: Connection): void {
    if (event.assignment) {
      this.start(event.assignment, connection);
    } else if (event.cancellation) {
      this.cancel(event.cancellation);
    }
  }

  private start(assignment: TaskAssignment__Output, connection: Connection): void {
    const key = `${assignment.taskId}#${assignment.attempt}`;
    const fields = {
      task_id: assignment.taskId,
      run_id: assignment.runId,
      task_name: assignment.taskName,
      attempt: assignment.attempt,
    };
    const running = this.attempts.get(key);
    if (running !== undefined) {
      // Sent again after a reconnection: the attempt is still running here, and will report.
      // The copy carries the deadline as the server has it now, which may be later.
      running.lease.movedTo(millis(assignment.deadline));
      log.info('attempt already in hand', fields);
      return;
    }
    log.info('task assigned', { ...fields, redelivered: assignment.redelivered });
    const held: Held = {
      controller: new AbortController(),
      lease: new Lease(
        millis(assignment.deadline),
        (byMs) => this.extend(assignment, byMs, connection),
        { initialMs: this.config.reconnectMs, maxMs: this.config.reconnectMaxMs },
      ),
    };
    this.attempts.set(key, held);
    const done = this.attempt(assignment, held, connection).finally(() => {
      this.attempts.delete(key);
      this.running.delete(done);
    });
    this.running.add(done);
  }

  private cancel(cancellation: TaskCancellation__Output): void {
    const held = this.attempts.get(`${cancellation.taskId}#${cancellation.attempt}`);
    log.info('task cancelled', {
      task_id: cancellation.taskId,
      attempt: cancellation.attempt,
      reason: cancellation.reason,
      in_hand: held !== undefined,
    });
    held?.controller.abort();
  }

  /** Ask for the attempt's lease to last `byMs` from now, at the server of the latest stream
   * (`via` until then); the new deadline. */
  private async extend(
    assignment: TaskAssignment__Output,
    byMs: number,
    via: Connection,
  ): Promise<number> {
    const ms = Math.ceil(byMs);
    const extendBy = { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
    const response = await unary<ExtendTaskLeaseResponse__Output>((callback) =>
      (this.connection ?? via).workflows.ExtendTaskLease(
        {
          taskId: assignment.taskId,
          agentId: this.config.agentId,
          attempt: assignment.attempt,
          extendBy,
        },
        bearer(this.token),
        callOptions(),
        callback,
      ),
    );
    return millis(response.deadline);
  }

  /**
   * Run one attempt and report how it went, keeping its lease from its arrival until the report
   * is answered, as the Python SDK's Worker does. A cancelled attempt reports nothing, and
   * neither does one whose lease the server will not extend because the attempt is no longer
   * this agent's: its work is stopped as a cancelled one's is.
   */
  private async attempt(
    assignment: TaskAssignment__Output,
    held: Held,
    via: Connection,
  ): Promise<void> {
    const fields = { task_id: assignment.taskId, attempt: assignment.attempt };
    const keeping = new AbortController();
    const kept = held.lease.keep(keeping.signal, fields).catch((error: unknown) => {
      if (error instanceof AttemptLost) {
        log.warning('attempt lost', { ...fields, reason: error.message });
        held.controller.abort();
      } else {
        log.error('lease keeping failed', { ...fields, error: String(error) });
      }
    });
    try {
      await this.workAndReport(assignment, held, via);
    } finally {
      keeping.abort();
      await kept;
    }
  }

  private async workAndReport(
    assignment: TaskAssignment__Output,
    held: Held,
    via: Connection,
  ): Promise<void> {
    const signal = held.controller.signal;
    const attempt = {
      taskId: assignment.taskId,
      agentId: this.config.agentId,
      attempt: assignment.attempt,
    };
    let output: JsonObject;
    try {
      output = await work(assignment, this.config.agentId, signal);
    } catch (error) {
      if (signal.aborted) {
        return; // cancelled: the server expects nothing more of this attempt
      }
      const failure = {
        ...attempt,
        error: error instanceof Error ? error.message : String(error),
        retryable: true,
      };
      await this.report('failed', assignment, held, via, (connection, metadata) =>
        unary<FailTaskResponse__Output>((done) =>
          connection.workflows.FailTask(failure, metadata, callOptions(), done),
        ),
      );
      return;
    }
    const result = { ...attempt, output: toStruct(output) };
    await this.report('completed', assignment, held, via, (connection, metadata) =>
      unary<CompleteTaskResponse__Output>((done) =>
        connection.workflows.CompleteTask(result, metadata, callOptions(), done),
      ),
    );
  }

  /**
   * Send an attempt's result, and send it again after a failure that may pass (the server
   * restarting, a replica gone) while the lease lasts (as extended meanwhile): the same result
   * twice is recorded once. It goes to the server of the latest stream (`via`, the one the task
   * came on, until then).
   */
  private async report(
    outcome: 'completed' | 'failed',
    assignment: TaskAssignment__Output,
    held: Held,
    via: Connection,
    send: (connection: Connection, metadata: grpc.Metadata) => Promise<unknown>,
  ): Promise<void> {
    const fields = {
      task_id: assignment.taskId,
      task_name: assignment.taskName,
      attempt: assignment.attempt,
    };
    const signal = held.controller.signal;
    for (
      let delay = this.config.reconnectMs;
      ;
      delay = Math.min(delay * 2, this.config.reconnectMaxMs)
    ) {
      try {
        await send(this.connection ?? via, bearer(this.token));
        log.info(`task ${outcome}`, fields);
        return;
      } catch (error) {
        if (!worthRetrying(error) || signal.aborted || Date.now() + delay >= held.lease.deadline) {
          log.warning(`task could not be reported ${outcome}`, {
            ...fields,
            ...statusFields(error),
          });
          return;
        }
        log.warning('report failed; retrying', { ...fields, ...statusFields(error) });
      }
      try {
        await sleep(delay, undefined, { signal });
      } catch {
        return; // cancelled, or abandoned by a stopping agent
      }
    }
  }

  /** Wait (up to the drain time) for the attempts in hand to finish and report; then abandon
   * the rest, which the server gives to another agent once this one's grace has passed. */
  private async drain(): Promise<void> {
    if (this.running.size === 0) {
      return;
    }
    log.info('finishing the tasks in hand', { tasks: this.running.size });
    const timer = new AbortController();
    await Promise.race([
      Promise.allSettled([...this.running]),
      sleep(this.config.drainMs, undefined, { signal: timer.signal }).catch(() => undefined),
    ]);
    timer.abort();
    this.abandon();
    await Promise.allSettled([...this.running]);
  }

  private abandon(): void {
    for (const held of this.attempts.values()) {
      held.controller.abort();
    }
  }
}
