/**
 * google.protobuf.Struct, which carries task inputs and outputs, as the plain JSON objects it
 * stands for. proto-loader hands a Struct over as its wire shape (`fields` of `Value`s with a
 * `kind`), so the agent converts at the edge and its work sees only JSON.
 */

import type { ListValue__Output } from './generated/google/protobuf/ListValue';
import type { Struct, Struct__Output } from './generated/google/protobuf/Struct';
import type { Value, Value__Output } from './generated/google/protobuf/Value';

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | JsonObject;

/** A JSON object: what a Struct holds. */
export interface JsonObject {
  [key: string]: Json;
}

/** A Struct as a JSON object (an absent Struct as an empty one). */
export function fromStruct(struct: Struct__Output | null): JsonObject {
  const object: JsonObject = {};
  for (const [key, value] of Object.entries(struct?.fields ?? {})) {
    object[key] = fromValue(value);
  }
  return object;
}

function fromList(list: ListValue__Output | null | undefined): Json[] {
  return (list?.values ?? []).map(fromValue);
}

function fromValue(value: Value__Output): Json {
  switch (value.kind) {
    case 'boolValue':
      return value.boolValue ?? false;
    case 'numberValue':
      return value.numberValue ?? 0;
    case 'stringValue':
      return value.stringValue ?? '';
    case 'structValue':
      return fromStruct(value.structValue ?? null);
    case 'listValue':
      return fromList(value.listValue);
    default:
      return null;
  }
}

/** A JSON object as a Struct. */
export function toStruct(object: JsonObject): Struct {
  const fields: Record<string, Value> = {};
  for (const [key, value] of Object.entries(object)) {
    fields[key] = toValue(value);
  }
  return { fields };
}

function toValue(value: Json): Value {
  if (value === null) {
    return { nullValue: 'NULL_VALUE' };
  }
  if (Array.isArray(value)) {
    return { listValue: { values: value.map(toValue) } };
  }
  switch (typeof value) {
    case 'boolean':
      return { boolValue: value };
    case 'number':
      return { numberValue: value };
    case 'string':
      return { stringValue: value };
    default:
      return { structValue: toStruct(value) };
  }
}
