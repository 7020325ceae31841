/**
 * The lease on one attempt the agent holds, kept before it ends, by the rules of the Python
 * SDK's Worker (opscore/client/_lease.py): when half of the lease is left, it is extended by the
 * lease's whole length again (what was left of it when the assignment arrived), so work of any
 * duration keeps its attempt. Work that hangs is the work's own business.
 */

import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { GONE, isServiceError, worthRetrying } from './api';
import * as log from './log';

/** The least a lease is extended by, whatever was left of it on arrival. */
const SHORTEST_MS = 1_000;

/** The longest single wait: a timer past 2^31 - 1 ms would fire at once, so a far deadline is
 * waited for in steps. */
const LONGEST_WAIT_MS = 3_600_000;

/** Asks the server for `byMs` more from now; the new deadline, in milliseconds since the epoch.
 * Rejects with the call's error. */
export type Extend = (byMs: number) => Promise<number>;

/** The server no longer counts the agent as the attempt's holder: nothing more may be reported
 * for it, and its work is stopped. */
export class AttemptLost extends Error {}

/** How long to wait after `failures` unanswered calls in a row (1 for the first): between half
 * and all of `initialMs` doubled for each failure after the first, at most `maxMs`. The jitter
 * spreads the agents that lost the same server. */
function backoff(failures: number, initialMs: number, maxMs: number): number {
  const ceiling = Math.min(initialMs * 2 ** Math.min(failures - 1, 32), maxMs);
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

/** Wait `ms`; false if `signal` aborted first. */
async function pause(ms: number, signal: AbortSignal): Promise<boolean> {
  try {
    await sleep(ms, undefined, { signal });
    return true;
  } catch {
    return false;
  }
}

/** The deadline of one attempt, moved by `keep` before it passes. */
export class Lease {
  /** What each extension asks for, in milliseconds. */
  readonly length: number;
  private end: number;
  /** When the next extension is due, on this machine's clock. */
  private due: number;

  /**
   * `deadline` is the assignment's, in milliseconds since the epoch (Infinity without one:
   * nothing to keep). The first extension is timed on the assumption that the two clocks agree,
   * as the reporting code's lease-end check assumes; the later ones are not (see `keep`).
   */
  constructor(
    deadline: number,
    private readonly extend: Extend,
    private readonly retry: { readonly initialMs: number; readonly maxMs: number },
  ) {
    this.end = deadline;
    this.length = Math.max(deadline - Date.now(), SHORTEST_MS);
    this.due = deadline - this.length / 2;
  }

  /** When the lease ends, in milliseconds since the epoch, as the server last said. */
  get deadline(): number {
    return this.end;
  }

  /** The server moved the deadline to `deadline` (an assignment sent again with a later one). */
  movedTo(deadline: number): void {
    if (deadline > this.end) {
      this.end = deadline;
      this.due = Math.max(this.due, deadline - this.length / 2);
    }
  }

  /**
   * Extend the lease whenever half of it is left, until `signal` aborts. Rejects with
   * `AttemptLost` once the server says the attempt is no longer the agent's (FAILED_PRECONDITION,
   * NOT_FOUND). An unanswered extension is tried again after a backoff, the deadline passed or
   * not: the server's answer says whether the attempt is still the agent's. Any other refusal
   * is logged and ends the keeping; the work goes on, and is reported if it ends in time.
   */
  async keep(signal: AbortSignal, fields: log.Fields): Promise<void> {
    if (!Number.isFinite(this.end)) {
      return;
    }
    let failures = 0;
    while (!signal.aborted) {
      const wait = this.due - Date.now();
      if (wait > 0) {
        // The deadline may move meanwhile: the loop looks again when this wait ends.
        if (!(await pause(Math.min(wait, LONGEST_WAIT_MS), signal))) {
          return;
        }
        continue;
      }
      try {
        this.end = Math.max(this.end, await this.extend(this.length));
        // The server's deadline is `length` from its own now: half of that from the answer is
        // when half is left, whatever the difference between the two clocks.
        this.due = Date.now() + this.length / 2;
        failures = 0;
      } catch (error) {
        if (isServiceError(error) && GONE.has(error.code)) {
          throw new AttemptLost(`${grpc.status[error.code]}: ${error.details}`);
        }
        const status: log.Fields = isServiceError(error)
          ? { code: grpc.status[error.code], details: error.details }
          : { error: String(error) };
        if (!worthRetrying(error)) {
          log.error('lease extension refused', { ...fields, ...status });
          return;
        }
        failures += 1;
        log.warning('lease extension unanswered', {
          ...fields,
          deadline: new Date(this.end).toISOString(),
          ...status,
        });
        if (!(await pause(backoff(failures, this.retry.initialMs, this.retry.maxMs), signal))) {
          return;
        }
      }
    }
  }
}
