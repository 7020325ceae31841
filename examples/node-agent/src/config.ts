/**
 * The agent's settings: command-line flags first, then environment variables, then defaults.
 * The registration token comes from the environment only, so it never shows in a process list.
 */

import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { parseArgs } from 'node:util';

/** TLS to the servers: PEM contents, read once at start (a file replaced later is not reread). */
export interface TlsConfig {
  /** The authorities the server's certificate must chain to; null for the system's. */
  readonly rootCerts: Buffer | null;
  /** The agent's client certificate (then its intermediates) and its unencrypted key, for a
   * server that requires mutual TLS; both null without one. */
  readonly certChain: Buffer | null;
  readonly privateKey: Buffer | null;
}

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
  /** TLS to the servers; null for plaintext. */
  readonly tls: TlsConfig | null;
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
  --tls                        connect over TLS, trusting the system's authorities
                               (OPSCORE_TLS=1; default plaintext)
  --tls-ca FILE                connect over TLS, trusting the authorities of this PEM file
                               (OPSCORE_TLS_CA)
  --tls-client-cert FILE       the agent's client certificate, PEM, for mutual TLS; implies
                               TLS, needs --tls-client-key (OPSCORE_TLS_CLIENT_CERT)
  --tls-client-key FILE        the unencrypted PEM key of --tls-client-cert
                               (OPSCORE_TLS_CLIENT_KEY)
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

function flag(value: string | undefined, name: string): boolean {
  const normalized = (value ?? '').trim().toLowerCase();
  if (!['1', 'true', 'yes', '0', 'false', 'no', ''].includes(normalized)) {
    throw new ConfigError(
      `${name} must be 1, true, yes, 0, false or no, not ${JSON.stringify(value)}`,
    );
  }
  return ['1', 'true', 'yes'].includes(normalized);
}

/** The contents of the file `file` names, for the setting `setting`; null for no file. */
function read(file: string | undefined, setting: string): Buffer | null {
  if (file === undefined || file === '') {
    return null;
  }
  try {
    return readFileSync(file);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new ConfigError(`${setting}: cannot read ${file}: ${reason}`);
  }
}

/** The TLS settings; null for plaintext. Any of the files implies TLS. */
function tlsConfig(
  parsed: {
    tls?: boolean;
    'tls-ca'?: string;
    'tls-client-cert'?: string;
    'tls-client-key'?: string;
  },
  env: NodeJS.ProcessEnv,
): TlsConfig | null {
  const caFile = parsed['tls-ca'] ?? env.OPSCORE_TLS_CA;
  const certFile = parsed['tls-client-cert'] ?? env.OPSCORE_TLS_CLIENT_CERT;
  const keyFile = parsed['tls-client-key'] ?? env.OPSCORE_TLS_CLIENT_KEY;
  const hasCert = certFile !== undefined && certFile !== '';
  const hasKey = keyFile !== undefined && keyFile !== '';
  if (hasCert !== hasKey) {
    throw new ConfigError(
      hasCert
        ? '--tls-client-cert (OPSCORE_TLS_CLIENT_CERT) needs its key: ' +
            'give --tls-client-key (OPSCORE_TLS_CLIENT_KEY) too'
        : '--tls-client-key (OPSCORE_TLS_CLIENT_KEY) needs its certificate: ' +
            'give --tls-client-cert (OPSCORE_TLS_CLIENT_CERT) too',
    );
  }
  const tls = parsed.tls === true || flag(env.OPSCORE_TLS, 'OPSCORE_TLS');
  const rootCerts = read(caFile, '--tls-ca (OPSCORE_TLS_CA)');
  if (rootCerts !== null) {
    try {
      // Node's TLS skips what it cannot parse in a CA bundle: without this check a wrong file
      // would show only as handshakes that fail, for ever.
      new X509Certificate(rootCerts);
    } catch (error) {
      const reason = error instanceof Error ? error.message : String(error);
      throw new ConfigError(
        `--tls-ca (OPSCORE_TLS_CA): ${caFile} holds no PEM certificate: ${reason}`,
      );
    }
  }
  const certChain = read(certFile, '--tls-client-cert (OPSCORE_TLS_CLIENT_CERT)');
  const privateKey = read(keyFile, '--tls-client-key (OPSCORE_TLS_CLIENT_KEY)');
  if (!tls && rootCerts === null && certChain === null) {
    return null;
  }
  return { rootCerts, certChain, privateKey };
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
        tls: { type: 'boolean' },
        'tls-ca': { type: 'string' },
        'tls-client-cert': { type: 'string' },
        'tls-client-key': { type: 'string' },
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
    tls: tlsConfig(parsed, env),
    reconnectMs: 250,
    reconnectMaxMs: 10_000,
    drainMs: 10_000,
  };
}
