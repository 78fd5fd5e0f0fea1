"""The package's rooms: subpackages by job, each importing only the layers below it, and an
inference path that loads neither the training stack nor, for an ONNX model, torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.core.paths import ROOT

from import_graph import PACKAGE_DIR, graph

# Lowest first: a subpackage may import itself and those before it, never those after it.
LAYERS = ["core", "data", "model", "localisation", "inference", "registry", "review", "evaluation", "training",
          "ops"]
# What a process that only classifies images must not load.
NOT_FOR_INFERENCE = ("neu_model.training", "neu_model.evaluation", "neu_model.registry", "neu_model.ops",
                     "mlflow", "matplotlib")


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_is_a_layer_with_a_docstring_and_nothing_else_in_its_init():
    packages = sorted(p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py"))
    assert packages == sorted(LAYERS)
    for init in [PACKAGE_DIR / "__init__.py", *(PACKAGE_DIR / name / "__init__.py" for name in LAYERS)]:
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and ast.get_docstring(ast.parse(init.read_text())), f"{init}: a docstring alone"


def test_the_package_root_holds_entry_points_only():
    assert len(list(PACKAGE_DIR.glob("*.py"))) <= 12


def test_lower_layers_never_import_higher_ones():
    wrong = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
             if layer(module) is not None and layer(target) is not None and layer(target) > layer(module)]
    assert not wrong, "; ".join(sorted(wrong))


def test_the_layer_check_sees_a_violation(tmp_path):
    package = tmp_path / "neu_model"
    for name in ("core", "training"):
        (package / name).mkdir(parents=True)
    (package / "core" / "a.py").write_text("def late():\n    from neu_model.training import b\n")
    (package / "training" / "b.py").write_text("x = 1\n")
    edges = graph(package)
    assert "neu_model.training.b" in edges["neu_model.core.a"]
    assert layer("neu_model.core.a") < layer("neu_model.training.b")


RUN_CLI = "from neu_model.inference.predict import cli\ntry:\n    cli()\nexcept SystemExit:\n    pass"


def loaded_modules(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running ``code`` (which may exit)."""
    probe = (f"import atexit, sys, json\natexit.register(lambda: print('MODULES=' + json.dumps(sorted(sys.modules)), "
             f"file=sys.__stderr__))\n{code}")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("MODULES=")]
    assert line, done.stderr[-2000:]
    import json

    return set(json.loads(line[-1][len("MODULES="):]))


def unwanted(loaded: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.slow
def test_neu_predict_help_loads_no_torch_mlflow_or_matplotlib():
    loaded = loaded_modules("import sys\nsys.argv = ['neu-predict', '--help']\n" + RUN_CLI)
    assert "neu_model.inference.predict" in loaded  # the probe saw the import
    assert not unwanted(loaded, ("torch", *NOT_FOR_INFERENCE))


def tiny_onnx(path: Path) -> Path:
    """A real ONNX model with the contract of the exported one: images (N,1,H,W) -> (N,6) probabilities."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6), "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, None, None])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 6])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.slow
def test_neu_predict_on_an_onnx_model_loads_no_torch(tmp_path):
    model = tiny_onnx(tmp_path / "model.onnx")
    image = ROOT / "tests" / "fixtures" / "NEU-tiny" / "Cr_1.bmp"
    out = tmp_path / "out.csv"
    loaded = loaded_modules(f"import sys\nsys.argv = ['neu-predict', {str(image)!r}, '--model', {str(model)!r}, "
                            f"'--runtime', 'onnx', '--out', {str(out)!r}]\n" + RUN_CLI)
    assert out.read_text().splitlines()[1].startswith(str(image))  # it did score the image
    assert "onnxruntime" in loaded
    assert not unwanted(loaded, ("torch", *NOT_FOR_INFERENCE))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["neu_model.inference.torch_model", "neu_model.inference.loading",
                                    "neu_model.inference.registry_files", "neu_model.inference.tile_boxes",
                                    "neu_model.inference.overlays", "neu_model.localisation.methods"])
def test_inference_modules_load_no_training_code_mlflow_matplotlib_or_other_runtimes(module):
    loaded = loaded_modules(f"import {module}")
    assert module in loaded
    assert not unwanted(loaded, (*NOT_FOR_INFERENCE, "onnxruntime", "openvino"))  # a runtime loads when it runs
