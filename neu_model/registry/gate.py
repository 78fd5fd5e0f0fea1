"""The promotion gate: the figures of champion and challenger on test images neither trained on, and the decision.

``register`` (the stage) calls these; the figures are ``neu_model.data.test_sets.figures``: all
test images, the public ones, the plant's labelled ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from neu_model.core.config import CLASSES
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_split, read_split, to_float
from neu_model.data.test_sets import ORIGINS, figures
from neu_model.inference.predictors import predict_batched, probabilities

EPS = 1e-9  # accuracies are rounded to 6 digits; "at least" must not fail on float noise


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


def figures_key(split_id: str, files: list[str]) -> str:
    """The tag that caches a version's figures on ``files`` of test split ``split_id``."""
    return f"figures_on.{split_id}.{hashlib.sha256(' '.join(files).encode()).hexdigest()[:8]}"


def champion_figures(client, name: str, champion, split_id: str, split_file: Path, image_dir: Path,
                     files: list[str]) -> tuple[dict, str | None]:
    """The champion's figures on ``files`` of test split ``split_id``: from its tags, else measured
    now and cached.

    Returns:
        (figures, note) where the note says the champion was re-evaluated, else None.
    """
    key = figures_key(split_id, files)
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
