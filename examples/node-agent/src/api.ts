/**
 * The Ops-Core API as this agent calls it: the services loaded at run time from the protos that
 * `npm run generate` copied beside it, typed by what it generated from the same files.
 */

import * as path from 'node:path';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

import { ConfigError, type TlsConfig } from './config';
import type { ProtoGrpcType as LifecycleProto } from './generated/agent_lifecycle';
import type { AgentLifecycleClient } from './generated/opscore/v1/AgentLifecycle';
import type { WorkflowServiceClient } from './generated/opscore/v1/WorkflowService';
import type { ProtoGrpcType as WorkflowProto } from './generated/workflow_service';

/** The package's copy of the protos (ours and the googleapis one they import), so that the
 * built agent runs wherever the package is put, without the repository. */
const INCLUDE_DIRS = [path.resolve(__dirname, '..', 'proto')];

/** The options `npm run generate` gives proto-loader-gen-types: the generated types describe
 * the objects this loader produces only when both use the same ones. */
const LOADER_OPTIONS: protoLoader.Options = {
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: INCLUDE_DIRS,
};

/** The server's keepalive policy allows a ping every 10 s at most; one every 30 s finds a dead
 * connection (a server or network gone without a word) within 40 s. */
const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': 30_000,
  'grpc.keepalive_timeout_ms': 10_000,
};

/** Milliseconds a unary call may take before the agent gives up on it (and retries, where it
 * may). */
const CALL_TIMEOUT_MS = 10_000;

type Proto = LifecycleProto & WorkflowProto;

function load(): Proto['opscore']['v1'] {
  const definition = protoLoader.loadSync(
    ['opscore/v1/agent_lifecycle.proto', 'opscore/v1/workflow_service.proto'],
    LOADER_OPTIONS,
  );
  // loadPackageDefinition is untyped (a GrpcObject); the generated ProtoGrpcType is its shape.
  return (grpc.loadPackageDefinition(definition) as unknown as Proto).opscore.v1;
}

/** The channel credentials of `tls`: plaintext for null. A client certificate that does not
 * parse, or a key that is not its certificate's, is a ConfigError. */
export function channelCredentials(tls: TlsConfig | null): grpc.ChannelCredentials {
  if (tls === null) {
    return grpc.credentials.createInsecure();
  }
  try {
    return grpc.credentials.createSsl(tls.rootCerts, tls.privateKey, tls.certChain);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new ConfigError(
      '--tls-client-cert and --tls-client-key ' +
        `(OPSCORE_TLS_CLIENT_CERT, OPSCORE_TLS_CLIENT_KEY): ${reason}`,
    );
  }
}

/** Both services' clients for one server. */
export interface Connection {
  readonly address: string;
  readonly lifecycle: AgentLifecycleClient;
  readonly workflows: WorkflowServiceClient;
}

/** Makes connections to servers, one per address, reused for as long as the agent runs, all
 * with the same `credentials` (plaintext, or TLS). */
export class Connections {
  private readonly services = load();
  private readonly open = new Map<string, Connection>();

  constructor(private readonly credentials: grpc.ChannelCredentials) {}

  /** The connection to `address` (made on first use; gRPC reconnects it as needed). */
  to(address: string): Connection {
    let connection = this.open.get(address);
    if (connection === undefined) {
      connection = {
        address,
        lifecycle: new this.services.AgentLifecycle(address, this.credentials, CHANNEL_OPTIONS),
        workflows: new this.services.WorkflowService(address, this.credentials, CHANNEL_OPTIONS),
      };
      this.open.set(address, connection);
    }
    return connection;
  }

  /** Close every connection. */
  close(): void {
    for (const connection of this.open.values()) {
      connection.lifecycle.close();
      connection.workflows.close();
    }
    this.open.clear();
  }
}

/** Call metadata carrying `token` as a bearer token (none for an empty token). */
export function bearer(token: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  if (token !== '') {
    metadata.set('authorization', `Bearer ${token}`);
  }
  return metadata;
}

/** The options of a unary call: its deadline. */
export function callOptions(): grpc.CallOptions {
  return { deadline: Date.now() + CALL_TIMEOUT_MS };
}

/** A unary call as a promise: `start` makes the call with the callback it is given. */
export function unary<Response>(
  start: (callback: grpc.requestCallback<Response>) => void,
): Promise<Response> {
  return new Promise((resolve, reject) => {
    start((error, response) => {
      if (error !== null) {
        reject(error);
      } else if (response === undefined) {
        reject(new Error('the call ended without a response'));
      } else {
        resolve(response);
      }
    });
  });
}

/** Whether `error` is a gRPC status (rather than a fault of the agent). */
export function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && 'code' in error && typeof error.code === 'number';
}

/** Statuses after which the same call may succeed later, or on another server. */
export const TRANSIENT: ReadonlySet<grpc.status> = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.RESOURCE_EXHAUSTED,
  grpc.status.CANCELLED,
]);

/** Statuses of a result or lease extension for an attempt that is no longer the agent's (its
 * lease ran out, its run was cancelled or failed, another result was recorded). */
export const GONE: ReadonlySet<grpc.status> = new Set([
  grpc.status.FAILED_PRECONDITION,
  grpc.status.NOT_FOUND,
]);

/** Whether a call an agent makes as itself (a result, a lease extension) may succeed if sent
 * again: a transient status, or UNAUTHENTICATED, since a registration since the call left
 * rotated the token it carried. */
export function worthRetrying(error: unknown): boolean {
  return (
    isServiceError(error) &&
    (TRANSIENT.has(error.code) || error.code === grpc.status.UNAUTHENTICATED)
  );
}
