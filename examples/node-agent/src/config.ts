/**
 * The agent's settings: command-line flags first, then environment variables, then defaults.
 * The registration token comes from the environment only, so it never shows in a process list.
 */

import { hostname } from 'node:os';
import { parseArgs } from 'node:util';

/** The agent's settings. */
export interface AgentConfig {
  /** Servers (`host:port`) the agent tries in turn: replicas, or one server. */
  readonly addresses: readonly string[];
  /** The agent's id, kept across restarts so the server recognises it. */
  readonly agentId: string;
  /** Capabilities the agent offers; tasks that name another one never reach it. */
  readonly capabilities: readonly string[];
  /** How many tasks the agent runs at once. */
  readonly maxConcurrentTasks: number;
  /** A registration (or operator) token for RegisterAgent; empty for a server that runs
   * without authentication. */
  readonly registrationToken: string;
  /** Milliseconds before the first reconnection; each failure in a row doubles it. */
  readonly reconnectMs: number;
  /** The longest wait between two reconnections, in milliseconds. */
  readonly reconnectMaxMs: number;
  /** Milliseconds a stopping agent waits for the tasks in hand to finish and be reported. */
  readonly drainMs: number;
}

/** A setting that cannot be used: the agent says which and exits with status 2. */
export class ConfigError extends Error {}

export const USAGE = `Usage: node dist/main.js [options]

  --address HOST:PORT          server to connect to; repeat for replicas (OPSCORE_ADDRESSES,
                               comma-separated; default localhost:50051)
  --agent-id ID                the agent's id (OPSCORE_AGENT_ID; default node-<hostname>)
  --capability NAME            a capability the agent offers; repeat for more
                               (OPSCORE_CAPABILITIES, comma-separated; default none)
  --max-concurrent-tasks N     tasks run at once (OPSCORE_MAX_CONCURRENT_TASKS; default 1)
  --help                       print this and exit

  OPSCORE_REGISTRATION_TOKEN   token for RegisterAgent (a registration or operator token);
                               unset for a server that runs without authentication
`;

function list(value: string | undefined): string[] {
  return (value ?? '')
    .split(',')
    .map((item) => item.trim())
    .filter((item) => item !== '');
}

function positive(value: string, name: string): number {
  const number = Number(value);
  if (!Number.isInteger(number) || number < 1) {
    throw new ConfigError(`${name} must be a positive integer, not ${JSON.stringify(value)}`);
  }
  return number;
}

/** The settings from `argv` (the arguments after the script) and `env`; null for `--help`. */
export function loadConfig(argv: readonly string[], env: NodeJS.ProcessEnv): AgentConfig | null {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      options: {
        address: { type: 'string', multiple: true },
        'agent-id': { type: 'string' },
        capability: { type: 'string', multiple: true },
        'max-concurrent-tasks': { type: 'string' },
        help: { type: 'boolean' },
      },
    }).values;
  } catch (error) {
    throw new ConfigError(error instanceof Error ? error.message : String(error));
  }
  if (parsed.help === true) {
    return null;
  }
  const addresses = parsed.address ?? list(env.OPSCORE_ADDRESSES);
  const slots = parsed['max-concurrent-tasks'] ?? env.OPSCORE_MAX_CONCURRENT_TASKS;
  return {
    addresses: addresses.length > 0 ? addresses : ['localhost:50051'],
    agentId: parsed['agent-id'] ?? env.OPSCORE_AGENT_ID ?? `node-${hostname()}`,
    capabilities: parsed.capability ?? list(env.OPSCORE_CAPABILITIES),
    maxConcurrentTasks: slots === undefined ? 1 : positive(slots, 'max-concurrent-tasks'),
    registrationToken: env.OPSCORE_REGISTRATION_TOKEN ?? '',
    reconnectMs: 250,
    reconnectMaxMs: 10_000,
    drainMs: 10_000,
  };
}
