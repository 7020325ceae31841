/**
 * The agent's log: one JSON object per line on standard error, as the server writes its own, so
 * one tool reads both.
 */

/** Values a log record may carry besides its message. */
export type Fields = Record<string, string | number | boolean | null | readonly string[]>;

function write(level: 'INFO' | 'WARNING' | 'ERROR', message: string, fields: Fields): void {
  const record = {
    time: new Date().toISOString(),
    level,
    logger: 'node-agent',
    message,
    ...fields,
  };
  process.stderr.write(`${JSON.stringify(record)}\n`);
}

/** Something the agent did: registered, connected, ran a task. */
export function info(message: string, fields: Fields = {}): void {
  write('INFO', message, fields);
}

/** Something that went wrong and that the agent works around (it retries, reconnects). */
export function warning(message: string, fields: Fields = {}): void {
  write('WARNING', message, fields);
}

/** Something the agent cannot work around: it stops. */
export function error(message: string, fields: Fields = {}): void {
  write('ERROR', message, fields);
}
