"""What the `opscore` command's tables show of a Struct: compact JSON, whole numbers as such,
keys in order."""

from __future__ import annotations

import json

from google.protobuf.struct_pb2 import Struct

from opscore.commands.render import compact


def test_a_struct_in_a_cell_writes_whole_numbers_without_a_fraction() -> None:
    value = Struct()
    value.update({"words": 13, "ratio": 0.5, "nested": {"sizes": [2, 2.5]}, "big": 2.0**60})
    cell = compact(value)
    assert " " not in cell
    assert cell.endswith('"words":13}')  # the last key
    assert json.loads(cell) == {
        "words": 13,
        "ratio": 0.5,
        "nested": {"sizes": [2, 2.5]},
        "big": 2.0**60,  # beyond what a double holds exactly: left as it is
    }
    assert '"big":1.152921504606847e+18' in cell
    assert compact(Struct()) == ""


def test_a_struct_in_a_cell_has_its_keys_in_order() -> None:
    value = Struct()
    value.update(dict.fromkeys(("zeta", "alpha", "mu", "beta"), 1))
    assert compact(value) == '{"alpha":1,"beta":1,"mu":1,"zeta":1}'
