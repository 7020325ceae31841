"""Inputs and outputs between their wire form, `google.protobuf.Struct`, and plain dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct

from opscore.client._context import JsonObject

NOT_A_STRUCT = (TypeError, ValueError, RecursionError, DecodeError)
"""What a dict that cannot go on the wire raises, as it becomes a Struct (a value JSON cannot
hold) or as that Struct is put in a request (protobuf checks how deep it nests only then)."""


def to_struct(value: Mapping[str, Any]) -> Struct:
    """A dict as a Struct (ValueError or TypeError for what JSON cannot hold)."""
    message = Struct()
    message.update(dict(value))
    return message


def to_dict(message: Struct) -> JsonObject:
    """A Struct as a dict (its numbers are floats, as JSON's are)."""
    return json_format.MessageToDict(message)
