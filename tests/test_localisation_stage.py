"""The boxes stage and the localisation part of evaluate: data/boxes.csv from each kind of source,
rewritten only on a change; localisation figures in the reports and MLflow, or a note saying why not."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from neu_model.core.config import BOXES_SOURCE_ENV, CLASSES, ConfigError, load_config
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError, run_stage
from neu_model.data.boxes import box_table, main, write_if_changed
from neu_model.data.neu_det import BOX_COLUMNS, read_boxes
from neu_model.evaluation.evaluate import evaluate
from neu_model.evaluation.localisation import SKIPPED, SUMMARY_KEYS, best_method, mlflow_metrics
from neu_model.localisation.geometry import boxes_by_file, iou_matrix
from neu_model.localisation.methods import DEFAULT_LOCATE, METHODS, params_from_dict

from conftest import FIXTURE_IMAGES, tiny_config
from download_support import FAST, PROXY_VARS, serve

FIXTURES = ROOT / "tests" / "fixtures"
BOXES_CSV = FIXTURES / "boxes.csv"  # NEU-DET's real boxes of the 30 NEU-tiny images
VOC_DIR = FIXTURES / "NEU-DET-annotations"  # crazing_1, inclusion_2, rolled-in_scale_3
HEADER = ",".join(BOX_COLUMNS) + "\n"


def keep_time(path: Path) -> int:
    """Set ``path``'s modification time to a fixed old value and return it, so a rewrite shows."""
    os.utime(path, ns=(10**18, 10**18))
    return path.stat().st_mtime_ns


# ---------------------------------------------------------------- the boxes stage

def test_boxes_stage_writes_the_table_and_leaves_an_unchanged_one_alone(tmp_path):
    out = tmp_path / "data" / "boxes.csv"
    assert main(["--set", f"data.boxes={BOXES_CSV}", "--out", str(out)]) is True
    table = pd.read_csv(out)
    assert list(table.columns) == BOX_COLUMNS and len(table) == len(pd.read_csv(BOXES_CSV))
    assert set(table["file"]) == {p.name for p in FIXTURE_IMAGES.iterdir()}
    assert set(table["box_class"]) <= set(CLASSES)  # NEU-DET's names as NEU-CLS codes

    mtime = keep_time(out)
    assert main(["--set", f"data.boxes={BOXES_CSV}", "--out", str(out)]) is False
    assert out.stat().st_mtime_ns == mtime  # untouched: DVC sees no change, evaluate does not rerun

    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(BOXES_CSV.read_text().splitlines(keepends=True)[:-1]))
    assert main(["--set", f"data.boxes={fewer}", "--out", str(out)]) is True
    assert out.stat().st_mtime_ns != mtime and len(pd.read_csv(out)) == len(table) - 1


def test_no_source_gives_a_header_only_table_and_says_how_to_give_boxes(tmp_path, caplog):
    out = tmp_path / "boxes.csv"
    with caplog.at_level(logging.INFO, logger="neu_model.data.boxes"):
        main(["--out", str(out)])
    assert out.read_text() == HEADER
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "localisation metrics will be skipped" in notes[0]
    assert "data.boxes" in notes[0] and "NEU_BOXES_SOURCE" in notes[0]


def test_environment_variable_overrides_data_boxes(tmp_path, monkeypatch):
    monkeypatch.setenv(BOXES_SOURCE_ENV, str(VOC_DIR))
    assert load_config(overrides=[f"data.boxes={BOXES_CSV}"]).data.boxes == str(VOC_DIR)
    main(["--set", f"data.boxes={BOXES_CSV}", "--out", str(tmp_path / "boxes.csv")])
    assert set(pd.read_csv(tmp_path / "boxes.csv")["file"]) == {"Cr_1.bmp", "In_2.bmp", "RS_3.bmp"}


def test_the_same_boxes_as_voc_files_or_csv_rows_give_the_same_bytes(tmp_path):
    from_voc, from_csv = tmp_path / "voc.csv", tmp_path / "csv.csv"
    rows = pd.read_csv(BOXES_CSV)
    subset = rows[rows["file"].isin(["Cr_1.bmp", "In_2.bmp", "RS_3.bmp"])].iloc[::-1]  # another row order
    subset.to_csv(tmp_path / "subset.csv", index=False)
    write_if_changed(box_table(str(VOC_DIR)), from_voc)
    write_if_changed(box_table(str(tmp_path / "subset.csv")), from_csv)
    assert from_voc.read_bytes() == from_csv.read_bytes()
    assert len(pd.read_csv(from_voc)) == len(subset)


@pytest.mark.parametrize("make_source,named", [
    (lambda tmp: tmp / "missing.csv", "no such file or folder"),
    (lambda tmp: _write(tmp / "wrong.csv", "image,x0,y0\nCr_1.bmp,1,2\n"), "missing columns"),
    (lambda tmp: _write(tmp / "bad.csv", HEADER + "Cr_1.bmp,Cr,crazing,50,1,10,9,200,200\n"), "is empty"),
    (lambda tmp: "ftp://example.org/boxes.zip", "unsupported URL scheme"),
])
def test_a_bad_source_is_refused_in_one_line_and_the_last_table_is_kept(tmp_path, capsys, make_source, named):
    out = tmp_path / "boxes.csv"
    write_if_changed(box_table(str(BOXES_CSV)), out)
    before = out.read_bytes()
    source = str(make_source(tmp_path))
    assert run_stage(main, ["--set", f"data.boxes={source}", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert source in error and named in error
    assert out.read_bytes() == before


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def no_proxy_in(tmp_path: Path, monkeypatch) -> None:
    """Work in ``tmp_path`` with no proxy between the stage and the server on 127.0.0.1."""
    monkeypatch.chdir(tmp_path)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def _voc_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("NEU-DET/README.txt", "annotations")
        for xml in sorted(VOC_DIR.iterdir()):
            zf.write(xml, f"NEU-DET/ANNOTATIONS/{xml.name}")
    return buffer.getvalue()


def test_url_of_a_zip_of_voc_files_is_downloaded_on_every_run(tmp_path, monkeypatch):
    no_proxy_in(tmp_path, monkeypatch)
    out = Path("data/boxes.csv")
    with serve({"/neu-det.zip": _voc_zip()}) as (base, hits):
        assert main(["--set", f"data.boxes={base}/neu-det.zip"]) is True
        mtime = keep_time(out)
        assert main(["--set", f"data.boxes={base}/neu-det.zip"]) is False
    assert hits["/neu-det.zip"] == 2  # fetched again: new boxes behind the same URL are seen
    assert out.stat().st_mtime_ns == mtime
    write_if_changed(box_table(str(VOC_DIR)), tmp_path / "voc.csv")
    assert out.read_bytes() == (tmp_path / "voc.csv").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["boxes.csv"]  # the download is gone


def test_url_errors_name_the_boxes_settings_and_hide_the_credentials(tmp_path, monkeypatch):
    no_proxy_in(tmp_path, monkeypatch)
    with serve({"/neu-det.zip": b"PK\x03\x04 not a zip at all"}, password="s3cret") as (base, _):
        url = base.replace("http://", "http://ci:s3cret@")
        not_archive = "not a folder, zip or tar archive; point data.boxes"
        for path, named in (("/missing.zip", "HTTP 404"), ("/neu-det.zip", not_archive)):
            with pytest.raises(StageError) as err:
                box_table(url + path, tmp_path, retry_delays=FAST)
            message = str(err.value)
            assert named in message and "s3cret" not in message and "http://***@127.0.0.1" in message
            assert "data.boxes" in message and "data.source" not in message and "NEU_DATA_SOURCE" not in message


# ---------------------------------------------------------------- the locate params

def test_params_locate_section_is_default_locate_and_can_be_overridden():
    assert params_from_dict(load_config().locate) == DEFAULT_LOCATE
    assert params_from_dict(load_config(overrides=["locate.method=classical"]).locate).method == "classical"
    with pytest.raises(ConfigError, match="no key 'locate.metod'.*keys there: method, cam_stage"):
        load_config(overrides=["locate.metod=classical"])


@pytest.mark.parametrize("section,named", [
    ({"methd": "classical"}, "unknown key locate.methd; check the spelling; keys under locate: method, cam_stage"),
    ({"classes": {"Cr": {"sigma": 3}}}, "unknown key locate.classes.Cr.sigma; check the spelling; keys under "
                                        "locate.classes.Cr: polarity, k"),
    ({"k": "high"}, "locate.k='high' must be a number"),
    ({"spread": [4]}, "locate.spread=[4] must be a list of 2 numbers"),
    ({"classes": {"Sc": {"max_regions": 2.5}}}, "locate.classes.Sc.max_regions=2.5 must be an integer"),
    ({"method": "yolo"}, "locate.method='yolo': choose one of whole_image, classical, gradcam, combined"),
])
def test_a_wrong_locate_section_is_refused_naming_the_key(section, named):
    with pytest.raises(ConfigError) as err:
        params_from_dict({**load_config().locate, **section})
    assert named in str(err.value)


def test_loading_params_needs_no_torch():
    code = "import sys, neu_model.core.config as c; c.load_config(); assert 'torch' not in sys.modules, 'torch loaded'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_best_method_on_validation_prefers_the_chosen_one_on_a_tie():
    def report(chosen, **accuracy):
        return {"chosen": chosen, "methods": {m: {"overall": {"box_accuracy": a}} for m, a in accuracy.items()}}

    assert best_method(report("combined", classical=0.6, combined=0.5, gradcam=0.2)) == "classical"
    assert best_method(report("combined", classical=0.6, combined=0.6)) == "combined"
    assert best_method(report("gradcam", whole_image=0.1, classical=0.3, combined=0.3, gradcam=0.2)) == "classical"
    summary = {"methods": {"combined": {"box_accuracy": 0.5, "recall": 0.25}}}
    assert mlflow_metrics(summary) == {"loc_combined_box_accuracy": 0.5, "loc_combined_recall": 0.25}
    assert mlflow_metrics(SKIPPED) == {}


# ---------------------------------------------------------------- evaluate

@pytest.fixture(scope="module")
def with_val(tiny_data, tmp_path_factory) -> Path:
    """The tiny split with one validation image a class and a test image in every class (30 images
    split by their own hashes leave some classes without one)."""
    table = pd.read_csv(tiny_data.split)
    table.loc[table["split"] == "val", "split"] = "train"
    for _, rows in table.groupby("label"):
        train = rows.index[rows["split"] == "train"]
        table.loc[train[0], "split"] = "val"
        if not (rows["split"] == "test").any():
            table.loc[train[1], "split"] = "test"
    path = tmp_path_factory.mktemp("split") / "split.csv"
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def box_file(tmp_path_factory) -> Path:
    """data/boxes.csv as the boxes stage writes it from the fixture's boxes."""
    path = tmp_path_factory.mktemp("boxes") / "boxes.csv"
    write_if_changed(box_table(str(BOXES_CSV)), path)
    return path


def whole_image_box_accuracy(files, boxes: pd.DataFrame) -> float:
    """The share of ``files`` whose boxes of their own class include one of IoU >= 0.5 with the whole image."""
    truth = boxes_by_file(boxes)
    return float(np.mean([iou_matrix([[0, 0, 200, 200]], truth[f]).max() >= 0.5 for f in files]))


@pytest.mark.slow
def test_evaluate_scores_every_method_on_test_and_validation(tiny_data, tiny_model, with_val, box_file, tmp_path):
    metrics = evaluate(tiny_config(), tiny_model, with_val, tiny_data.images, tmp_path, box_file)
    split = pd.read_csv(with_val)
    test_files, val_files = (list(split.loc[split["split"] == s, "file"]) for s in ("test", "val"))
    summary = json.loads((tmp_path / "metrics.json").read_text())["localisation"]
    assert summary == json.loads(json.dumps(metrics["localisation"]))
    assert summary["chosen"] == "combined" and summary["images"] == len(test_files)
    assert set(summary["methods"]) == set(METHODS)
    for figures in summary["methods"].values():
        assert set(figures) == set(SUMMARY_KEYS) and all(0 <= v <= 1 for v in figures.values())

    report = json.loads((tmp_path / "localisation.json").read_text())
    for method, figures in summary["methods"].items():
        assert figures == {k: report["test"]["methods"][method]["overall"][k] for k in SUMMARY_KEYS}
        assert set(report["test"]["methods"][method]["classes"]) == set(CLASSES)
    boxes = read_boxes(box_file)
    assert summary["methods"]["whole_image"]["box_accuracy"] == round(whole_image_box_accuracy(test_files, boxes), 4)
    assert report["validation"]["images"] == len(val_files) == len(CLASSES)
    assert report["validation"]["methods"]["whole_image"]["overall"]["box_accuracy"] == \
        round(whole_image_box_accuracy(val_files, boxes), 4)
    assert report["best_on_validation"] == summary["best_on_validation"] == best_method(report["validation"])
    assert (tmp_path / "locate_gallery.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_chosen_method_that_validation_does_not_favour_is_warned_about(tiny_data, tiny_model, with_val, box_file,
                                                                         tmp_path, caplog):
    evaluate(tiny_config(), tiny_model, with_val, tiny_data.images, tmp_path, box_file)
    accuracy = {m: f["overall"]["box_accuracy"]
                for m, f in json.loads((tmp_path / "localisation.json").read_text())["validation"]["methods"].items()}
    worse = min(METHODS, key=accuracy.get)
    with caplog.at_level(logging.WARNING, logger="neu_model.evaluation.localisation"):
        metrics = evaluate(tiny_config(f"locate.method={worse}"), tiny_model, with_val, tiny_data.images, tmp_path,
                           box_file)
    best = metrics["localisation"]["best_on_validation"]
    warned = [r for r in caplog.records if "finds more boxes" in r.getMessage()]
    assert metrics["localisation"]["chosen"] == worse and accuracy[best] == max(accuracy.values())
    if accuracy[worse] == max(accuracy.values()):  # a tie: the chosen method is as good, nothing to warn about
        assert best == worse and not warned
    else:
        assert [r.getMessage() for r in warned if f"locate.method is {worse}, but {best} finds" in r.getMessage()]


@pytest.mark.parametrize("boxes", ["none", "header only", "no test image"])
@pytest.mark.slow
def test_evaluate_without_boxes_says_skipped_and_still_draws_the_gallery(tiny_data, tiny_model, tmp_path, boxes):
    box_path = None if boxes == "none" else tmp_path / "boxes.csv"
    if boxes == "header only":
        box_path.write_text(HEADER)
    elif boxes == "no test image":
        rows = pd.read_csv(BOXES_CSV)
        test_files = set(pd.read_csv(tiny_data.split).query("split == 'test'")["file"])
        rows[~rows["file"].isin(test_files)].to_csv(box_path, index=False)
    metrics = evaluate(tiny_config(), tiny_model, tiny_data.split, tiny_data.images, tmp_path, box_path)
    assert metrics["localisation"] == {"skipped": "no boxes: set data.boxes or NEU_BOXES_SOURCE"}
    assert json.loads((tmp_path / "metrics.json").read_text())["localisation"] == metrics["localisation"]
    assert json.loads((tmp_path / "localisation.json").read_text()) == metrics["localisation"]
    assert (tmp_path / "locate_gallery.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_bad_input_before_any_work(tiny_data, tiny_model, tmp_path):
    with pytest.raises(StageError, match="no box table; run the boxes stage first"):
        evaluate(tiny_config(), tiny_model, tiny_data.split, tiny_data.images, tmp_path, tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="locate.k='high' must be a number"):
        evaluate(tiny_config("locate.k=high"), tiny_model, tiny_data.split, tiny_data.images, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_logs_the_localisation_figures_into_the_training_run(tiny_data, tiny_model, box_file, tmp_path):
    shutil.copy(tiny_model.with_name("run.json"), tmp_path / "run.json")
    metrics = evaluate(tiny_config(), tiny_model, tiny_data.split, tiny_data.images, tmp_path, box_file)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    logged = client.get_run(run_id).data.metrics
    for method, figures in metrics["localisation"]["methods"].items():
        for key, value in figures.items():
            assert logged[f"loc_{method}_{key}"] == value
    paths = {a.path for folder in ("figures", "evaluation") for a in client.list_artifacts(run_id, folder)}
    assert {"figures/locate_gallery.png", "evaluation/localisation.json"} <= paths
