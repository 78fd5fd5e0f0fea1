"""Stage ``register``: the evaluated model becomes a registry version; a gate decides on ``champion``.

Each pipeline pass registers its model as a new version of ``register.model_name`` with the alias
``challenger``. ``champion`` moves to it only when its test accuracy is at least
``register.accuracy_floor`` and at least the champion's accuracy plus ``register.min_improvement``,
both on the same test split of the same dataset version (the champion is re-evaluated on the new
split when the data or split changed). With ``inference.mirror`` the version is the mirror-averaged
twin of the run's model, logged here. Before the gate, the export stage's files go into the run
under ``exported/`` (``neu_model.registry.export_artifacts``). Moving the alias is the last step, so a crash before it
leaves ``champion`` where it was. Decision and reasons go into the version's tags and description;
the promotion history is read back from the versions' ``promotion.*`` tags.

    python -m neu_model.registry.register              # register + gate (what dvc.yaml runs)
    python -m neu_model.registry.register --history    # versions, aliases and promotion history
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from neu_model.core import paths, provenance
from neu_model.core.config import Config, add_config_args, load_config
from neu_model.core.files import write_json
from neu_model.core.paths import (
    EXPORT_REPORT,
    IMAGE_DIR,
    MANIFEST,
    METRICS_FILE,
    MODEL_FILE,
    MODELS_DIR,
    REGISTRATION_FILE,
    ROOT,
    SPLIT_FILE,
)
from neu_model.core.stage import StageError, run_stage
from neu_model.data.dataset import read_manifest, read_split
from neu_model.data.test_sets import ORIGINS, fair_test_files, split_rule
from neu_model.registry import export_artifacts as exported
from neu_model.registry import mlflow_model, tracking
from neu_model.registry.gate import challenger_figures, champion_figures, decide, figures_key
from neu_model.registry.history import format_listing, listing
from neu_model.registry.lineage import read_dvc
from neu_model.registry.mlflow_model import CONTRACT

log = logging.getLogger("neu_model.registry.register")

CHAMPION, CHALLENGER = "champion", "challenger"


def test_split_id(split_file: Path, dataset_version: str) -> str:
    """Names "the same test split of the same dataset version": accuracies compare only within one id."""
    rows = read_split(split_file)
    rows = rows[rows["split"] == "test"].sort_values("file")
    text = dataset_version + "\n" + "\n".join(rows["file"] + "," + rows["label"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=CONTRACT)
        except MlflowException:
            client.get_registered_model(name)  # created meanwhile by another process; else raise


def _version_of_run(client, name: str, run_id: str, mirror: bool):
    """The version registered from this run with this mirror setting (versions from before the
    setting existed are plain), or None."""
    found = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
             if v.tags.get("inference.mirror", "false") == str(mirror).lower()]
    return min(found, key=lambda v: int(v.version)) if found else None


def _served_model(run: tracking.Run, cfg: Config, model_file: Path) -> tuple[str, str | None]:
    """(model URI, model id) of what the version serves: the run's model, or its mirror-averaged twin."""
    if not cfg.inference.mirror:
        return run.record["model_uri"], run.record.get("model_id")
    info = mlflow_model.log_model(run.client, run.experiment_id, run.run_id, model_file, cfg.data.image_size,
                                  mirror=True)
    return info.model_uri, info.model_id


def register(cfg: Config, run_file: Path = paths.RUN_FILE, metrics_file: Path = METRICS_FILE,
             split_file: Path = SPLIT_FILE, image_dir: Path = IMAGE_DIR, model_file: Path = MODEL_FILE,
             out_file: Path = REGISTRATION_FILE, export_report: Path = EXPORT_REPORT,
             models_dir: Path = MODELS_DIR, manifest: Path = MANIFEST) -> dict:
    """Register the evaluated and exported model, apply the gate, write ``out_file``; returns what it wrote."""
    run = tracking.open_run(run_file, model_file)
    if run is None:
        raise StageError(f"{run_file} is missing or names another model than {model_file}; rerun train and evaluate")
    if not Path(metrics_file).is_file():
        raise StageError(f"{metrics_file}: not found; run the evaluate stage first")
    metrics = json.loads(Path(metrics_file).read_text())
    split_id = test_split_id(split_file, run.record["dataset_version"])
    logged = run.client.get_run(run.run_id).data
    if logged.tags.get("test_split_id") != split_id or logged.metrics.get("test_accuracy") != metrics["accuracy"]:
        raise StageError(f"{metrics_file} is not the evaluation logged in MLflow run {run.run_id} on the test "
                         f"split of {split_file}; rerun the evaluate stage")
    client, name, mirror = run.client, cfg.register.model_name, cfg.inference.mirror
    accuracy, rule = float(metrics["accuracy"]), split_rule(cfg)
    predictions = Path(metrics_file).with_name("predictions.csv")
    table = read_split(split_file)
    every_test = sorted(table.loc[table["split"] == "test", "file"])
    mine = challenger_figures(metrics, predictions, split_file, every_test)
    report = exported.checked_report(export_report, run.record["model_sha256"], mirror, models_dir)

    _ensure_registered_model(client, name)
    version = _version_of_run(client, name, run.run_id, mirror)  # a rerun (e.g. after a crash) reuses its version
    if version is None:
        tags = {"test_accuracy": accuracy, "macro_f1": metrics["macro_f1"], f"accuracy_on.{split_id}": accuracy,
                figures_key(split_id, every_test): json.dumps(mine),
                "test_split_id": split_id, "dataset_version": run.record["dataset_version"], "run_id": run.run_id,
                "model": run.record.get("model", ""), "git_sha": provenance.git_sha(),
                "inference.mirror": str(mirror).lower(), "split_rule": rule,
                "labels_version": run.record.get("labels_version") or "none"}
        tags |= {f"test_{k}_{o}": v for o in ORIGINS for k, v in (("images", mine[o]["images"]),
                                                                   ("accuracy", mine[o]["accuracy"]))}
        model_uri, model_id = _served_model(run, cfg, model_file)
        version = client.create_model_version(name, model_uri, run_id=run.run_id, model_id=model_id,
                                              tags={k: str(v) for k, v in tags.items()}, description=CONTRACT)
        log.info("registered %s version %s from run %s", name, version.version, run.run_id)
    v = str(version.version)  # MLflow returns ints here and strings elsewhere
    # Before any alias points at the version: a client resolving it finds its files. Every pass:
    # the export may have been judged again (other export.* params) for the same model.
    exported.log_exported(run, export_report, report, models_dir, model_file)
    for key, value in exported.version_tags(report).items():
        client.set_model_version_tag(name, v, key, value)
    client.set_registered_model_alias(name, CHALLENGER, v)

    champion = _champion(client, name)
    before = str(champion.version) if champion else None
    if before == v:  # a rerun after the alias moved: the decision is already recorded
        verdict, reasons = "champion", [f"v{v} is already champion"]
    else:
        champ, notes = None, []
        if champion is not None:
            # The images neither model trained on: today's test part, less any the champion's split
            # rule (another seed or fractions) put in its training or validation part.
            files = fair_test_files(table, lambda: read_manifest(manifest), rule, champion.tags.get("split_rule"),
                                    ROOT / cfg.data.checksums)
            champ_figures, note = champion_figures(client, name, champion, split_id, split_file, image_dir, files)
            champ, notes = (before, champ_figures), [note] if note else []
            if files != every_test:
                mine = challenger_figures(metrics, predictions, split_file, files)
                notes.append(f"champion v{before} was trained under another split rule ({champion.tags['split_rule']}"
                             f"): compared on the {len(files)} of {len(every_test)} test images test under both")
        promote, reasons = decide(mine, cfg.register.accuracy_floor, cfg.register.min_improvement, champ)
        reasons = notes + reasons
        verdict = "promoted" if promote else "rejected"
        headline = (f"PROMOTED to champion, replacing {'v' + before if before else 'none'}" if promote
                    else f"REJECTED: champion stays {'v' + before if before else 'unset'}")
        # The decision is written before the alias moves: if the process dies in between, champion
        # is still the old version and a rerun of this stage finishes the move.
        gate = {"gate.decision": verdict, "gate.reasons": "; ".join(reasons), "gate.champion_before": before or "",
                "gate.floor": cfg.register.accuracy_floor, "gate.min_improvement": cfg.register.min_improvement,
                "gate.figures": json.dumps({"challenger": mine, "champion": champ[1] if champ else None}),
                "gate.decided_at": _now()}
        for key, value in gate.items():
            client.set_model_version_tag(name, v, key, str(value))
        client.update_model_version(name, v, description=f"Gate: {headline}\n"
                                    + "".join(f"- {r}\n" for r in reasons) + "\n" + CONTRACT)
        if promote:
            client.set_registered_model_alias(name, CHAMPION, v)
    tags = client.get_model_version(name, v).tags
    if verdict != "rejected" and "promotion.at" not in tags:
        # The history entry, written once the alias has moved (or by the rerun that finds it moved).
        client.set_model_version_tag(name, v, "promotion.replaced", tags.get("gate.champion_before", ""))
        client.set_model_version_tag(name, v, "promotion.at", _now())
    after = _champion(client, name)
    result = {"model_name": name, "version": v, "run_id": run.run_id, "decision": verdict,
              "promoted": verdict == "promoted", "reasons": reasons,
              "test_accuracy": accuracy, "test_split_id": split_id, "dataset_version": run.record["dataset_version"],
              "labels_version": run.record.get("labels_version"), "test_sets": {o: mine[o] for o in ORIGINS},
              "champion_before": before, "champion": str(after.version) if after else None,
              "model_uri": f"models:/{name}@{CHAMPION}"}
    run.set_tags({"registry.model": name, "registry.version": v, "registry.decision": verdict}
                 | read_dvc(stages=("train", "evaluate", "export")))
    write_json(out_file, result)
    log.info("%s v%s: %s (%s); champion: %s", name, v, verdict, "; ".join(reasons), result["champion"])
    return result


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--history", action="store_true", help="list versions, aliases and promotions; change nothing")
    parser.add_argument("--json", action="store_true", help="with --history: print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    if args.history:
        data = listing(tracking.connect(), cfg.register.model_name)
        print(json.dumps(data, indent=2) if args.json else format_listing(data))
        return
    register(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(main))
