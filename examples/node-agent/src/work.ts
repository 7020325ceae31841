/**
 * What the agent does with a task: it echoes the task's input and says who ran it. A real agent
 * replaces this function; everything around it (registration, the stream, reports, cancellation,
 * reconnection) stays as it is.
 */

import { setTimeout as sleep } from 'node:timers/promises';

import type { TaskAssignment__Output } from './generated/opscore/v1/TaskAssignment';
import { fromStruct, type JsonObject } from './json';

/**
 * The output of one attempt at `assignment`. An input field `work_ms` makes the work last that
 * many milliseconds, so that cancellations can be seen. `signal` aborts when the attempt is
 * cancelled: the promise then rejects, and nothing is reported.
 */
export async function work(
  assignment: TaskAssignment__Output,
  agentId: string,
  signal: AbortSignal,
): Promise<JsonObject> {
  const input = fromStruct(assignment.input);
  if (typeof input.work_ms === 'number' && input.work_ms > 0) {
    await sleep(input.work_ms, undefined, { signal });
  }
  return {
    agent_id: agentId,
    runtime: `node ${process.version}`,
    task_name: assignment.taskName,
    attempt: assignment.attempt,
    input,
    dependencies: Object.keys(assignment.dependencyOutputs).sort(),
  };
}
