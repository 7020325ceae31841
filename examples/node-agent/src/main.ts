/**
 * The agent's command: settings from flags and environment, the agent until it stops, SIGTERM
 * and SIGINT to stop it cleanly. Exit status 0 once stopped, 1 when the server refuses it for
 * good, 2 for settings it cannot use.
 */

import { Agent } from './agent';
import { Connections } from './api';
import { ConfigError, loadConfig, USAGE } from './config';
import * as log from './log';

async function main(): Promise<number> {
  let config;
  try {
    config = loadConfig(process.argv.slice(2), process.env);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n\n${USAGE}`);
      return 2;
    }
    throw error;
  }
  if (config === null) {
    process.stdout.write(USAGE);
    return 0;
  }
  const connections = new Connections();
  const agent = new Agent(config, connections);
  process.on('SIGTERM', () => agent.stop());
  process.on('SIGINT', () => agent.stop());
  log.info('starting', { agent_id: config.agentId, addresses: config.addresses });
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
