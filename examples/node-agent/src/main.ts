/**
 * The agent's command: settings from flags and environment, the agent until it stops, SIGTERM
 * and SIGINT to stop it cleanly. Exit status 0 once stopped, 1 when the server refuses it for
 * good, 2 for settings it cannot use.
 */

import { Agent } from './agent';
import { channelCredentials, Connections } from './api';
import { ConfigError, loadConfig, USAGE } from './config';
import * as log from './log';

/** Log Node's own warnings as records: printed as they come, in plain text on standard error,
 * they would break its one JSON object a line. grpc-js, for one, gives TLS an IP address as
 * its server name (DEP0123, grpc/grpc-node#1919) when a server's address is one. */
function logWarnings(): void {
  process.removeAllListeners('warning');
  process.on('warning', (warning) => {
    const code = 'code' in warning && typeof warning.code === 'string' ? warning.code : null;
    log.warning('node warning', { name: warning.name, code, details: warning.message });
  });
}

async function main(): Promise<number> {
  logWarnings();
  let config;
  let credentials;
  try {
    config = loadConfig(process.argv.slice(2), process.env);
    if (config === null) {
      process.stdout.write(USAGE);
      return 0;
    }
    // Made once, here: a client certificate that does not match its key stops the agent now,
    // not at its first handshake.
    credentials = channelCredentials(config.tls);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n\n${USAGE}`);
      return 2;
    }
    throw error;
  }
  const connections = new Connections(credentials);
  const agent = new Agent(config, connections);
  process.on('SIGTERM', () => agent.stop());
  process.on('SIGINT', () => agent.stop());
  log.info('starting', {
    agent_id: config.agentId,
    addresses: config.addresses,
    tls: config.tls !== null,
    client_certificate: config.tls !== null && config.tls.certChain !== null,
  });
  try {
    return await agent.run();
  } finally {
    connections.close();
  }
}

main().then(
  (status) => {
    // Set rather than exit: the process ends once its last log line is written.
    process.exitCode = status;
  },
  (error: unknown) => {
    log.error('crashed', {
      error: error instanceof Error ? (error.stack ?? error.message) : String(error),
    });
    process.exitCode = 1;
  },
);
