"""dvc.yaml's deps: each ``python -m neu_model.X`` stage lists exactly the modules X runs.

A module missing from the list would let DVC skip a stage whose code changed; a module listed
but not imported reruns the stage for nothing.
"""

from __future__ import annotations

import re

import pytest
import yaml

from neu_model.core.paths import ROOT

from import_graph import closure, graph, modules

STAGE_COMMAND = re.compile(r"python -m (neu_model\.[\w.]+)")


def module_stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name to (the module its cmd runs, its deps) for the ``python -m neu_model.X`` stages."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, spec in stages.items():
        cmd = spec.get("cmd", "")
        match = STAGE_COMMAND.match(cmd if isinstance(cmd, str) else " && ".join(cmd))
        if match:
            found[name] = (match.group(1), spec.get("deps", []))
    return found


STAGES = module_stages()


def test_the_pipeline_stages_run_neu_model_modules():
    assert {"train", "evaluate", "register"} <= set(STAGES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_exactly_the_modules_it_imports(stage):
    module, deps = STAGES[stage]
    files = modules()
    assert module in files, f"dvc.yaml stage {stage} runs {module}, which is no file in neu_model/"
    # a package's __init__.py holds its docstring alone (tests/test_layers.py): no stage depends on it
    needed = {files[m].relative_to(ROOT).as_posix() for m in closure(module, graph()) if files[m].name != "__init__.py"}
    listed = {d for d in deps if re.fullmatch(r"neu_model/[\w/]+\.py", d)}
    missing, stale = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not stale, (f"dvc.yaml stage {stage}: add to deps {missing}; "
                                       f"remove from deps {stale} (not imported by {module})")
