"""Import hygiene: no import cycle inside ``neu_model``, and inference loads no training code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from neu_model.core.paths import ROOT

from import_graph import cycles, graph

# What a process that only classifies images must not load: training code, MLflow, plotting.
TRAINING_ONLY = ("neu_model.training.train", "neu_model.training.augment", "neu_model.evaluation.figures", "mlflow", "matplotlib")


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


def imported_modules(code: str) -> set[str]:
    """The modules a fresh interpreter imports to run ``code``, from ``-X importtime``'s report."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # Lines read "import time: <self us> | <cumulative us> | <indented module name>".
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("module", ["neu_model.inference.predict", "neu_model.inference.torch_model", "neu_model.inference.registry_files"])
def test_inference_loads_no_training_code_mlflow_or_matplotlib(module):
    loaded = imported_modules(f"import {module}")
    assert module in loaded and "torch" in loaded  # the report was read
    unwanted = sorted(m for m in loaded if m.split(".")[0] in TRAINING_ONLY or m in TRAINING_ONLY)
    assert not unwanted, f"{module} imports {unwanted}"
