"""The register stage and its gate, against a real SQLite registry in a temporary folder.

Every test uses its own registered-model name. Candidates are runs that reuse the tiny model
with a chosen test accuracy, so each gate decision is exercised on known numbers; the champion's
re-evaluation on a changed split runs the real registry model.
"""

import json
import os
import shutil
import sys
import urllib.request
import uuid
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from neu_model.core.stage import StageError
from neu_model.data.dataset import load_split, to_float
from neu_model.data.split import split
from neu_model.evaluation.evaluate import evaluate
from neu_model.inference.torch_model import load_torch_model, predict_logits
from neu_model.ops.pgserver import free_port
from neu_model.registry import register as register_stage  # module access: pytest would collect a bare test_split_id
from neu_model.registry.gate import decide
from neu_model.registry.history import format_listing, listing
from neu_model.registry.register import main, register

from conftest import tiny_config
from server_support import running_server


@pytest.fixture(scope="module")
def evaluated(tiny_data, tiny_model, tmp_path_factory) -> Path:
    """reports/ of the tiny model's pipeline pass: run.json and metrics.json of an evaluated run."""
    reports = tmp_path_factory.mktemp("reports")
    shutil.copy(tiny_model.with_name("run.json"), reports / "run.json")
    evaluate(tiny_config("evaluate.robustness=false"), tiny_model, tiny_data.split, tiny_data.images, reports)
    return reports


@pytest.fixture
def name() -> str:
    return f"neu-test-{uuid.uuid4().hex[:8]}"


def candidate(evaluated: Path, tmp_path: Path, accuracy: float, split_file: Path,
              dataset_version: str | None = None) -> Path:
    """A pipeline pass whose evaluation scored ``accuracy`` on ``split_file``: a new run, same model."""
    record = json.loads((evaluated / "run.json").read_text())
    record["dataset_version"] = dataset_version or record["dataset_version"]
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(record["experiment_id"]).info.run_id
    client.log_metric(run_id, "test_accuracy", accuracy)
    client.set_tag(run_id, "test_split_id", register_stage.test_split_id(split_file, record["dataset_version"]))
    client.set_terminated(run_id)
    reports = tmp_path / run_id
    reports.mkdir()
    (reports / "run.json").write_text(json.dumps(record | {"run_id": run_id}))
    (reports / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy}))  # no test_sets:
    # as evaluate wrote it before the plant's images, so the gate must take it as all public
    return reports


@pytest.fixture
def run_register(tiny_export):
    """The register stage on a pass's reports, publishing the tiny model's exported files."""

    def run(name, reports, ws, model_file, split_file=None, *overrides):
        cfg = tiny_config(f"register.model_name={name}", "inference.mirror=false", *overrides)  # as tiny_export
        return register(cfg, reports / "run.json", reports / "metrics.json", split_file or ws.split, ws.images,
                        model_file, reports / "registration.json", tiny_export / "export.json", tiny_export)

    return run


def aliases(name) -> dict:
    aliases = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_registered_model(name).aliases
    return {a: str(v) for a, v in aliases.items()}


def figures(public: float, plant: float | None = None, n_public: int = 540, n_plant: int = 4) -> dict:
    """Figures as neu_model.data.test_sets.figures gives them."""
    sets = {"public": {"images": n_public, "accuracy": public},
            "plant": {"images": n_plant if plant is not None else 0, "accuracy": plant}}
    n = sum(s["images"] for s in sets.values())
    pooled = sum(s["images"] * (s["accuracy"] or 0) for s in sets.values()) / n
    return {"all": {"images": n, "accuracy": pooled}, **sets}


def test_gate_rules():
    assert decide(figures(0.96), 0.95, 0.0, None)[0] is True
    assert decide(figures(0.94), 0.95, 0.0, None)[0] is False
    assert decide(figures(0.97), 0.95, 0.0, ("1", figures(0.97)))[0] is True   # "at least": a tie promotes
    assert decide(figures(0.975), 0.95, 0.01, ("1", figures(0.97)))[0] is False  # not enough improvement
    assert decide(figures(0.94), 0.95, 0.0, ("1", figures(0.90)))[0] is False  # better, but under the floor
    promote, reasons = decide(figures(0.96), 0.95, 0.01, ("3", figures(0.96)))
    assert not promote and "champion v3 0.9600" in reasons[1] and "0.9700" in reasons[1]


def test_gate_decides_on_every_test_image_with_the_floor_on_the_public_figure():
    # the plant's 4 test images: the challenger gets all right, the champion 1; the public set ties
    promote, reasons = decide(figures(0.99, 1.0), 0.95, 0.0, ("2", figures(0.99, 0.25)))
    assert promote and "public 0.9900 (540), plant 1.0000 (4); champion: public 0.9900 (540), plant 0.2500 (4)" \
        in reasons[-1]
    # one public image worse, three plant images better: better on all 544 together
    assert decide(figures(0.99 - 1 / 540, 1.0), 0.95, 0.0, ("2", figures(0.99, 0.25)))[0] is True
    # perfect on the plant's images, but the public figure is under the floor
    assert decide(figures(0.90, 1.0), 0.95, 0.0, ("2", figures(0.89, 0.0)))[0] is False
    assert "plant - (0)" in decide(figures(0.99), 0.95, 0.0, None)[1][-1]


@pytest.mark.slow
def test_real_evaluated_run_is_registered_with_its_metrics(evaluated, tiny_data, tiny_model, name, run_register):
    result = run_register(name, evaluated, tiny_data, tiny_model, None, "register.accuracy_floor=0.0")
    metrics = json.loads((evaluated / "metrics.json").read_text())
    record = json.loads((evaluated / "run.json").read_text())
    version = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, result["version"])
    assert result["decision"] == "promoted" and result["champion"] == result["version"] == "1"
    assert version.run_id == record["run_id"] and version.source == record["model_uri"]
    assert float(version.tags["test_accuracy"]) == metrics["accuracy"]
    assert float(version.tags["macro_f1"]) == metrics["macro_f1"]
    assert version.tags["dataset_version"] == record["dataset_version"] and version.tags["run_id"] == record["run_id"]
    assert version.tags["gate.decision"] == "promoted" and "PROMOTED" in version.description
    assert aliases(name) == {"champion": "1", "challenger": "1"}
    assert json.loads((evaluated / "registration.json").read_text()) == json.loads(json.dumps(result))
    tags = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(record["run_id"]).data.tags
    assert tags["registry.version"] == "1"
    # Running the stage again for the same run registers nothing new.
    assert run_register(name, evaluated, tiny_data, tiny_model)["version"] == "1"
    assert len(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_model_versions(f"name = '{name}'")) == 1


@pytest.mark.slow
def test_first_model_must_pass_the_floor(evaluated, tiny_data, tiny_model, tmp_path, name, run_register):
    low = run_register(name, candidate(evaluated, tmp_path, 0.90, tiny_data.split), tiny_data, tiny_model)
    assert low["decision"] == "rejected" and low["champion"] is None
    assert aliases(name) == {"challenger": "1"}
    first = run_register(name, candidate(evaluated, tmp_path, 0.95, tiny_data.split), tiny_data, tiny_model)
    assert first["decision"] == "promoted" and aliases(name) == {"champion": "2", "challenger": "2"}
    assert "no champion yet" in " ".join(first["reasons"])


@pytest.mark.slow
def test_promote_then_keep_the_champion(evaluated, tiny_data, tiny_model, tmp_path, name, run_register):
    def reg(acc, *overrides):
        return run_register(name, candidate(evaluated, tmp_path, acc, tiny_data.split), tiny_data, tiny_model,
                            None, *overrides)

    assert reg(0.96)["champion"] == "1"
    assert reg(0.97)["decision"] == "promoted"                       # beats 0.96 + 0
    kept = reg(0.965)
    assert kept["decision"] == "rejected" and kept["champion"] == "2"
    assert aliases(name) == {"champion": "2", "challenger": "3"}
    assert reg(0.975, "register.min_improvement=0.01")["decision"] == "rejected"  # needs 0.98
    version = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, "4")
    assert version.tags["gate.decision"] == "rejected" and "0.9800" in version.tags["gate.reasons"]
    assert "REJECTED: champion stays v2" in version.description

    data = listing(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), name)
    assert [(h["version"], h["replaced"]) for h in data["history"]] == [("1", None), ("2", "1")]
    assert data["history"][1]["replaced_accuracy"] == "0.96"
    assert [r["decision"] for r in data["versions"]] == ["promoted", "promoted", "rejected", "rejected"]
    text = format_listing(data)
    assert "champion=v2" in text and "v2 (0.97) replaced v1" in text


def _accuracy(model_file, split_file, image_dir) -> float:
    test = load_split("test", split_file, image_dir)
    net, _ = load_torch_model(model_file)
    predicted = predict_logits(net, test.images, torch.device("cpu")).argmax(1)
    return round((predicted == test.labels).float().mean().item(), 6)


@pytest.mark.slow
def test_changed_split_reevaluates_the_champion_first(evaluated, tiny_data, tiny_model, tmp_path, name, run_register):
    assert run_register(name, candidate(evaluated, tmp_path, 0.96, tiny_data.split), tiny_data, tiny_model,
                        None, "register.accuracy_floor=0.0")["champion"] == "1"
    new_split = tmp_path / "split.csv"
    split(tiny_config("seed=7"), tiny_data.raw / "manifest.csv", new_split)
    on_new = _accuracy(tiny_model, new_split, tiny_data.images)  # what the champion really scores there
    # 0.96 on the old split would block it; on the new split the champion scores far less.
    challenger = min(1.0, on_new + 0.05)
    kept = run_register(name, candidate(evaluated, tmp_path, challenger, new_split), tiny_data, tiny_model,
                        new_split, "register.accuracy_floor=0.0", "register.min_improvement=0.1")
    assert kept["decision"] == "rejected"
    assert "re-evaluated on the new test split" in kept["reasons"][0] and f"{on_new:.4f}" in kept["reasons"][0]
    champion = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, "1")
    assert float(champion.tags[f"accuracy_on.{kept['test_split_id']}"]) == pytest.approx(on_new, abs=1e-6)
    promoted = run_register(name, candidate(evaluated, tmp_path, challenger, new_split), tiny_data, tiny_model,
                            new_split, "register.accuracy_floor=0.0")
    assert promoted["decision"] == "promoted" and aliases(name)["champion"] == "3"
    # A new dataset version with the same files is a different test split too.
    moved = run_register(name, candidate(evaluated, tmp_path, 1.0, new_split, "feedbeef0000"), tiny_data,
                         tiny_model, new_split, "register.accuracy_floor=0.0")
    assert "re-evaluated" in moved["reasons"][0] and moved["decision"] == "promoted"


@pytest.mark.slow
def test_crash_before_the_alias_moves_leaves_the_old_champion(evaluated, tiny_data, tiny_model, tmp_path,
                                                             name, monkeypatch, run_register):
    run_register(name, candidate(evaluated, tmp_path, 0.96, tiny_data.split), tiny_data, tiny_model)
    better = candidate(evaluated, tmp_path, 0.99, tiny_data.split)
    real = MlflowClient.set_registered_model_alias

    def crash_on_champion(self, model, alias, version):
        if alias == "champion":
            raise RuntimeError("killed")
        return real(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", crash_on_champion)
    with pytest.raises(RuntimeError):
        run_register(name, better, tiny_data, tiny_model)
    assert aliases(name) == {"champion": "1", "challenger": "2"}
    assert MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_model_version(name, "1").tags["test_accuracy"] == "0.96"
    assert [h["version"] for h in listing(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), name)["history"]] == ["1"]

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    again = run_register(name, better, tiny_data, tiny_model)  # the rerun finishes the job
    assert again["version"] == "2" and again["decision"] == "promoted" and aliases(name)["champion"] == "2"
    history = listing(MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), name)["history"]
    assert [(h["version"], h["replaced"]) for h in history] == [("1", None), ("2", "1")]


def test_stale_metrics_are_refused(evaluated, tiny_data, tiny_model, tmp_path, name, run_register):
    reports = candidate(evaluated, tmp_path, 0.96, tiny_data.split)
    (reports / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "macro_f1": 0.5}))
    with pytest.raises(StageError, match="rerun the evaluate stage"):
        run_register(name, reports, tiny_data, tiny_model)


@pytest.mark.slow
def test_history_command_and_champion_for_a_plain_client(evaluated, tiny_data, tiny_model, tmp_path, name, capsys,
                                                         run_register):
    run_register(name, candidate(evaluated, tmp_path, 0.96, tiny_data.split), tiny_data, tiny_model)
    main(["--history", "--set", f"register.model_name={name}"])
    out = capsys.readouterr().out
    assert "promotion history" in out and "champion=v1" in out
    main(["--history", "--json", "--set", f"register.model_name={name}"])
    assert json.loads(capsys.readouterr().out)["aliases"] == {"champion": "1", "challenger": "1"}

    test = load_split("test", tiny_data.split, tiny_data.images)
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(to_float(test.images).numpy())
    assert served.shape == (len(test), 8)  # six probabilities, the unknown score and flag
    np.testing.assert_allclose(served[:, :6].sum(1), 1, atol=1e-5)
    assert set(np.unique(served[:, 7])) <= {0.0, 1.0}


@pytest.mark.slow
def test_served_champion_answers_invocations(evaluated, tiny_data, tiny_model, tmp_path, name, run_register):
    run_register(name, candidate(evaluated, tmp_path, 0.96, tiny_data.split), tiny_data, tiny_model)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # serve runs `uvicorn` from PATH
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port)]
    with running_server(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", 180, env=env):
        x = to_float(load_split("test", tiny_data.split, tiny_data.images).images[:4]).numpy()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         json.dumps({"inputs": x.tolist()}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.array(json.loads(response.read())["predictions"], dtype=np.float32)
        local = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(x)
        assert served.shape == (4, 8)
        np.testing.assert_allclose(served, local, atol=1e-5)
