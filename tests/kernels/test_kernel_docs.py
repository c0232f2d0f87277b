"""docs/kernels.md's backend table is the registry's own declaration, not a copy that can drift."""

import pathlib
import re

from kernels.hstu_attention import registry

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "kernels.md"


def test_capability_table_matches_registry():
    text = DOC.read_text()
    match = re.search(r"<!-- capability-table:start -->\n(.*?)<!-- capability-table:end -->", text, re.S)
    assert match, "docs/kernels.md lost its capability-table markers"
    assert match.group(1) == registry.capability_table(), (
        "docs/kernels.md is out of date; paste registry.capability_table() between the markers")


def test_capability_table_lists_every_backend_once():
    table = registry.capability_table()
    for name in registry.BACKENDS:
        assert table.count(f"| `{name}` |") == 1
