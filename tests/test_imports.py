"""Import hygiene: no import cycle inside ``neu_model`` (the layers are tests/test_layers.py)."""

from __future__ import annotations

from import_graph import cycles, graph


def test_no_import_cycle_in_neu_model():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_cycles_are_found_through_function_level_imports(tmp_path):
    package = tmp_path / "neu_model"
    package.mkdir()
    (package / "a.py").write_text("from neu_model import b\n")
    (package / "b.py").write_text("def late():\n    from neu_model.c import x\n    return x\n")
    (package / "c.py").write_text("import neu_model.a\nx = 1\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neu_model import e\n")
    (package / "e.py").write_text("from neu_model import d\n")
    edges = graph(package)
    assert cycles(edges) == [["neu_model.a", "neu_model.b", "neu_model.c", "neu_model.a"]]
    assert edges["neu_model.d"] == set()  # a type-checking import never runs
