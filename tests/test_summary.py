"""What `make pipeline` prints last: a few lines from the reports, and the stage list from dvc.yaml."""

from __future__ import annotations

import json
import shutil

from neu_model.core.paths import ROOT
from neu_model.ops.orchestrate import pipeline_stages
from neu_model.ops.summary import main, summary_lines


def test_the_summary_of_the_committed_reports_is_short_and_names_every_figure(tmp_path, capsys):
    shutil.copytree(ROOT / "reports", tmp_path / "reports")
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    lines = summary_lines(tmp_path)
    assert len(lines) <= 9 and all(len(line) <= 140 for line in lines)
    text = "\n".join(lines)
    assert f"{100 * metrics['accuracy']:.2f} %" in text and f"{metrics['errors']} errors of {metrics['n_test']}" in text
    assert f"{100 * metrics['robustness']['mean_accuracy']:.2f} %" in text
    public = metrics["test_sets"]["public"]
    assert f"public {100 * public['accuracy']:.2f} % of {public['images']}" in text
    assert f"{metrics['review']['flagged']} of {metrics['n_test']} flagged" in text
    assert f"localisation  {metrics['localisation']['chosen']}:" in text
    registration = json.loads((tmp_path / "reports" / "registration.json").read_text())
    assert f"version {registration['version']} {registration['decision']}" in text
    main(["--project", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == lines


def test_a_fresh_checkout_without_reports_says_what_is_missing(tmp_path):
    text = "\n".join(summary_lines(tmp_path))
    assert "robustness    not measured" in text and "export        not run" in text
    assert "unknown       not measured" in text
    assert "registry      no decision recorded" in text


def test_the_unknown_line_names_the_method_and_the_shares(tmp_path):
    (tmp_path / "reports").mkdir()
    unknown = {"method": "knn", "auroc": 0.9512, "non_steel_flagged_share": 0.7, "test_flagged_share": 0.0111,
               "corrupted_flagged_share": 0.05}
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps({"unknown": unknown}))
    line = next(ln for ln in summary_lines(tmp_path) if ln.startswith("unknown"))
    assert line == ("unknown       knn: non-steel flagged 70.0 % (AUROC 0.951), test images 1.1 %, "
                    "corrupted steel 5.0 %")


def test_stage_list_comes_from_dvc_yaml_in_its_order(tmp_path):
    stages = pipeline_stages(ROOT)
    assert [s.name for s in stages] == ["source", "download", "boxes", "split", "train", "evaluate", "export",
                                        "register"]
    assert [s.name for s in stages if s.always_changed] == ["source"]
    assert stages[0].record.as_posix() == "data/source.json"
    (tmp_path / "dvc.yaml").write_text("stages:\n  b:\n    cmd: x\n  a:\n    cmd: y\n    always_changed: true\n"
                                       "    outs:\n      - out.json:\n          cache: false\n")
    assert [(s.name, s.always_changed, s.record and s.record.name) for s in pipeline_stages(tmp_path)] == [
        ("b", False, None), ("a", True, "out.json")]
