"""A real neu-predict CSV as the review's input: the model sidecar it writes (the version an alias
resolved to), and tiles read back from strips and archives as the model saw them."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from neu_model.inference.predict import cli as predict
from neu_model.review.queue import REVIEW, load_queue
from neu_model.review.tiles import read_tile

from conftest import FIXTURE_IMAGES
from review_support import strip

MODEL_NAME = "review-sidecar-model"


def test_neu_predict_out_writes_the_model_sidecar_and_the_csv_is_a_review_queue(tiny_model, tmp_path, capsys):
    image = strip(tmp_path / "strip.png")
    with zipfile.ZipFile(tmp_path / "day.zip", "w") as zf:
        for name in ("Sc_2", "RS_3"):
            zf.write(FIXTURE_IMAGES / f"{name}.bmp", f"cam/{name}.bmp")
    out = tmp_path / "pred.csv"
    status = predict(["--model", str(tiny_model), "--device", "cpu", "--review-below", "1", str(image),
                      str(tmp_path / "day.zip"), "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    sidecar = json.loads(Path(f"{out}.model.json").read_text())
    assert sidecar["model"] == str(tiny_model) and sidecar["runtime"] == "torch" and sidecar["review_below"] == 1.0
    assert dt.datetime.fromisoformat(sidecar["written_at"]).tzinfo is not None
    queue = load_queue([out], 0.0)
    assert len(queue.tiles) == 8 and all(t.queue == REVIEW for t in queue.tiles)  # everything below 1 is flagged
    assert {t.model_version for t in queue.tiles} == {str(tiny_model)} and not queue.notes
    pixels = np.asarray(Image.open(image))
    for tile in queue.tiles:
        got = read_tile(tile.origin.ref, tile.x, tile.y)
        if tile.origin.member:
            name = Path(tile.origin.member).stem
            assert np.array_equal(got, np.asarray(Image.open(FIXTURE_IMAGES / f"{name}.bmp")))
        else:
            assert np.array_equal(got, pixels[tile.y:tile.y + 200, tile.x:tile.x + 200])


def test_the_sidecar_names_the_version_an_alias_resolved_to(tiny_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("NEU_MODEL_CACHE", str(tmp_path / "cache"))
    client = MlflowClient()
    experiment = client.create_experiment(MODEL_NAME, artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model(MODEL_NAME)
    report = tmp_path / "export.json"
    report.write_text(json.dumps({"mirror": False, "variants": {}}))
    for _ in range(2):  # two versions: the alias points at the second
        run_id = client.create_run(experiment).info.run_id
        for source in (tiny_model, report):
            client.log_artifact(run_id, str(source), "exported")
        version = client.create_model_version(MODEL_NAME, f"runs:/{run_id}/exported", run_id=run_id).version
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    out = tmp_path / "pred.csv"
    assert predict(["--model", f"models:/{MODEL_NAME}@champion", "--runtime", "torch", "--device", "cpu",
                    str(FIXTURE_IMAGES / "Cr_1.bmp"), "--out", str(out)]) == 0
    assert json.loads(Path(f"{out}.model.json").read_text())["model"] == f"models:/{MODEL_NAME}/{version}" == \
        f"models:/{MODEL_NAME}/2"
    assert {t.model_version for t in load_queue([out], 1.0).tiles} == {f"models:/{MODEL_NAME}/2"}
