"""What the `opscore` command's tables show of a Struct: compact JSON, whole numbers as such."""

from __future__ import annotations

import json

from google.protobuf.struct_pb2 import Struct

from opscore.commands.render import compact


def test_a_struct_in_a_cell_writes_whole_numbers_without_a_fraction() -> None:
    value = Struct()
    value.update({"words": 13, "ratio": 0.5, "nested": {"sizes": [2, 2.5]}, "big": 2.0**60})
    cell = compact(value)
    assert " " not in cell
    assert '"words":13,' in cell or cell.endswith('"words":13}')
    assert json.loads(cell) == {
        "words": 13,
        "ratio": 0.5,
        "nested": {"sizes": [2, 2.5]},
        "big": 2.0**60,  # beyond what a double holds exactly: left as it is
    }
    assert '"big":1.152921504606847e+18' in cell
    assert compact(Struct()) == ""
