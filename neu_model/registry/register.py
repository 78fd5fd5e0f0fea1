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

import numpy as np
import pandas as pd

from neu_model.core import paths, provenance
from neu_model.core.config import CLASSES, Config, add_config_args, load_config
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
from neu_model.data.dataset import load_split, read_manifest, read_split, to_float
from neu_model.data.test_sets import ORIGINS, fair_test_files, figures, split_rule
from neu_model.inference.predictors import predict_batched, probabilities
from neu_model.registry import export_artifacts as exported
from neu_model.registry import mlflow_model, tracking
from neu_model.registry.lineage import read_dvc
from neu_model.registry.mlflow_model import CONTRACT

log = logging.getLogger("neu_model.registry.register")

CHAMPION, CHALLENGER = "champion", "challenger"
EPS = 1e-9  # accuracies are rounded to 6 digits; "at least" must not fail on float noise


def test_split_id(split_file: Path, dataset_version: str) -> str:
    """Names "the same test split of the same dataset version": accuracies compare only within one id."""
    rows = read_split(split_file)
    rows = rows[rows["split"] == "test"].sort_values("file")
    text = dataset_version + "\n" + "\n".join(rows["file"] + "," + rows["label"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def decide(figures: dict, floor: float, min_improvement: float,
           champion: tuple[str, dict] | None) -> tuple[bool, list[str]]:
    """The gate: (promote?, reasons).

    ``figures`` and the champion's are ``neu_model.data.test_sets.figures`` on the same test
    images, which neither model trained on. The floor applies to the public figure (the whole
    test part when it has no public image); the comparison to all those images together, each
    counted once: the plant's labelled test images are too few to decide alone (one image moves
    their figure by points) and the public ones alone ignore what retraining on labels is for.
    """
    public = figures["public"] if figures["public"]["images"] else figures["all"]
    passes_floor = public["accuracy"] >= floor - EPS
    reasons = [f"public test accuracy {public['accuracy']:.4f} {'>=' if passes_floor else '<'} floor {floor:.4f}"]
    if champion is None:
        reasons.append("no champion yet: the first version that passes the floor becomes champion")
        return passes_floor, reasons + [_both(figures)]
    version, champ = champion
    accuracy, needed = figures["all"]["accuracy"], champ["all"]["accuracy"] + min_improvement
    beats = accuracy >= needed - EPS
    reasons.append(f"test accuracy {accuracy:.4f} {'>=' if beats else '<'} champion v{version} "
                   f"{champ['all']['accuracy']:.4f} + min_improvement {min_improvement:.4f} = {needed:.4f} "
                   f"(on {figures['all']['images']} test images neither trained on)")
    reasons.append(f"{_both(figures)}; champion: {_both(champ)}")
    return passes_floor and beats, reasons


def _both(figures: dict) -> str:
    """The two figures as one phrase: 'public 0.9981 (540), plant 0.7500 (4)'."""
    return ", ".join(f"{o} {f['accuracy']:.4f} ({f['images']})" if f["images"] else f"{o} - (0)"
                     for o, f in ((o, figures[o]) for o in ORIGINS))


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


def evaluate_version(name: str, version: str, split_file: Path, image_dir: Path, files: list[str],
                     batch_size: int = 64) -> dict:
    """Figures (``test_sets.figures``) of a registry version on ``files`` of the current test split,
    through the plain pyfunc interface."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    test = load_split("test", split_file, image_dir)
    keep = np.isin(test.files, files)
    if not keep.any():
        raise StageError(f"{split_file}: no test images to re-evaluate the champion on")
    probs = predict_batched(lambda images: probabilities(model, to_float(images).numpy()), test.images[keep],
                            batch_size)
    table = read_split(split_file).set_index("file").loc[np.asarray(test.files)[keep]].reset_index()
    return figures(table.assign(predicted=[CLASSES[i] for i in probs.argmax(1)]))


def champion_figures(client, name: str, champion, split_id: str, split_file: Path, image_dir: Path,
                     files: list[str]) -> tuple[dict, str | None]:
    """The champion's figures on ``files`` of test split ``split_id``: from its tags, else measured
    now and cached.

    Returns:
        (figures, note) where the note says the champion was re-evaluated, else None.
    """
    key = f"figures_on.{split_id}.{hashlib.sha256(' '.join(files).encode()).hexdigest()[:8]}"
    if key in champion.tags:
        return json.loads(champion.tags[key]), None
    result = evaluate_version(name, champion.version, split_file, image_dir, files)
    client.set_model_version_tag(name, champion.version, key, json.dumps(result))
    client.set_model_version_tag(name, champion.version, f"accuracy_on.{split_id}", str(result["all"]["accuracy"]))
    note = (f"dataset or split changed (test split {champion.tags.get('test_split_id', '?')} -> {split_id}): "
            f"champion v{champion.version} re-evaluated on the new test split ({len(files)} images): "
            f"{result['all']['accuracy']:.4f} "
            f"(was {float(champion.tags.get('test_accuracy', 'nan')):.4f})")
    return result, note


def challenger_figures(metrics: dict, predictions: Path, split_file: Path, files: list[str]) -> dict:
    """This run's figures on ``files``: evaluate's own when they are the whole test part."""
    table = read_split(split_file)
    if sorted(table.loc[table["split"] == "test", "file"]) == files:
        every = {"images": len(files), "accuracy": metrics["accuracy"]}
        # an evaluation from before the plant's images existed: all of it is the public set
        return {"all": every, **metrics.get("test_sets", {"public": every, "plant": {"images": 0, "accuracy": None}})}
    if not Path(predictions).is_file():
        raise StageError(f"{predictions}: not found; rerun the evaluate stage")
    frame = pd.read_csv(predictions)
    return figures(frame[frame["file"].isin(files)])


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
            files = fair_test_files(table, read_manifest(manifest), rule, champion.tags.get("split_rule"),
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


def listing(client, name: str) -> dict:
    """Versions with their aliases and gate results, and the promotion history, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        raise StageError(f"no registered model {name!r} in {client.tracking_uri}; run the pipeline first") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version))
    rows = [{"version": str(m.version), "aliases": sorted(by_version.get(str(m.version), [])),
             "test_accuracy": m.tags.get("test_accuracy"), "model": m.tags.get("model"),
             "dataset_version": m.tags.get("dataset_version"), "test_split_id": m.tags.get("test_split_id"),
             "decision": m.tags.get("gate.decision"), "reasons": m.tags.get("gate.reasons"),
             "run_id": m.run_id, "created": _ms(m.creation_timestamp)} for m in versions]
    tags = {str(m.version): m.tags for m in versions}
    history = sorted(({"at": t["promotion.at"], "version": v, "replaced": t.get("promotion.replaced") or None,
                       "test_accuracy": t.get("test_accuracy"),
                       "replaced_accuracy": tags.get(t.get("promotion.replaced"), {})
                       .get(f"accuracy_on.{t.get('test_split_id')}")}
                      for v, t in tags.items() if "promotion.at" in t), key=lambda h: (h["at"], int(h["version"])))
    return {"model_name": name, "aliases": {a: str(x) for a, x in aliases.items()}, "versions": rows,
            "history": history}


def _ms(stamp: int | None) -> str:
    return dt.datetime.fromtimestamp((stamp or 0) / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def format_listing(data: dict) -> str:
    """The listing as plain text for a terminal."""
    lines = [f"registered model {data['model_name']}  aliases: "
             + ", ".join(f"{a}=v{v}" for a, v in sorted(data["aliases"].items())), "",
             f"{'ver':>4}  {'aliases':<20} {'model':<10} {'accuracy':>8}  {'dataset':<12} {'split':<12} "
             f"{'decision':<9} run"]
    for r in data["versions"]:
        lines.append(f"{r['version']:>4}  {','.join(r['aliases']) or '-':<20} {r['model'] or '?':<10} "
                     f"{r['test_accuracy'] or '?':>8}  {r['dataset_version'] or '?':<12} "
                     f"{r['test_split_id'] or '?':<12} "
                     f"{r['decision'] or '-':<9} {r['run_id']}")
    lines += ["", "promotion history:"]
    for h in data["history"]:
        old = f"v{h['replaced']} ({h['replaced_accuracy'] or '?'} on the same split)" if h["replaced"] else "none"
        lines.append(f"  {h['at']}  v{h['version']} ({h['test_accuracy']}) replaced {old}")
    if not data["history"]:
        lines.append("  (none)")
    return "\n".join(lines)


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
