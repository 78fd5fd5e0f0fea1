"""What data a run read and wrote: the split as MLflow dataset inputs, ``dvc.lock`` hashes as tags.

The git SHA tag already pins the code, so only data deps and outs are read from ``dvc.lock``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
import yaml

DVC_CODE_SUFFIXES = (".py", ".sha256")  # code deps: the git SHA tag already pins them


def read_dvc(stages: tuple[str, ...] = (), inputs_of: str | None = None, root: Path = Path(".")) -> dict[str, str]:
    """Hashes ``dvc.lock`` records: the deps and outs of ``stages``, or the data inputs of ``inputs_of``.

    ``inputs_of`` looks up each data dep of that stage among the outs of the other stages, since
    its own entry is the previous run's until DVC finishes it. Missing files give ``{}``.

    Returns:
        Tag name to md5: ``dvc.<stage>.<deps|outs>.<path>`` and ``dvc.input.<path>`` (with the
        producing out in parentheses when the dep lies inside it).
    """
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for stage in stages:
        for kind in ("deps", "outs"):
            for item in lock.get(stage, {}).get(kind, []):
                if not item["path"].endswith(DVC_CODE_SUFFIXES):
                    out[f"dvc.{stage}.{kind}.{item['path']}"] = item.get("md5", "")
    if inputs_of:
        produced = {o["path"]: o.get("md5", "")
                    for name, s in lock.items() if name != inputs_of for o in s.get("outs", [])}
        for dep in spec.get(inputs_of, {}).get("deps", []):
            for path, md5 in produced.items():
                if dep == path or dep.startswith(path + "/"):
                    out[f"dvc.input.{dep}"] = md5 if dep == path else f"{md5} ({path})"
    return out


def split_inputs(split_file: Path, manifest: Path, dataset_version: str) -> list:
    """The split, with each file's sha256, as one MLflow ``DatasetInput`` per part (context train/val/test)."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    table = pd.read_csv(split_file, dtype=str)
    if Path(manifest).exists():
        table = table.merge(pd.read_csv(manifest, dtype=str)[["file", "sha256"]], on="file", how="left")
    inputs = []
    for part in ("train", "val", "test"):
        rows = table[table["split"] == part].reset_index(drop=True).astype(object)
        # Own digest over every row: MLflow's samples rows and fails on pandas' arrow strings.
        digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:12]
        with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(rows, source=str(Path(split_file).resolve()), targets="label",
                                         name=f"NEU-CLS-{part}", digest=digest)
        tags = [InputTag("mlflow.data.context", part), InputTag("dataset_version", dataset_version)]
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
    return inputs + [labels_input(Path(manifest), table)]


def labels_input(manifest: Path, table: pd.DataFrame):
    """The data as one MLflow ``DatasetInput`` named ``training-data`` whose digest is the plant's
    labels version (``data/raw/labels.json``; ``public`` without labels), with the counts of public
    and plant images: the run's data version, as the labels commit announced it."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    info = json.loads((manifest.parent / "labels.json").read_text()) if (manifest.parent / "labels.json").is_file() \
        else {}
    origin = table["origin"] if "origin" in table else pd.Series("public", index=table.index)
    counts = {"public_images": int((origin == "public").sum()), "plant_images": int((origin == "plant").sum()),
              "plant_unknown_kept_aside": int(info.get("plant_unknown") or 0)}
    rows = table.astype(object).reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(rows, source=str(manifest.resolve()), targets="label", name="training-data",
                                     digest=info.get("labels_version") or "public")
    tags = [InputTag("mlflow.data.context", "training"), *(InputTag(k, str(v)) for k, v in counts.items())]
    return DatasetInput(ds._to_mlflow_entity(), tags=tags)


def labels_version(manifest: Path) -> str | None:
    """The plant's labels version the download stage merged (``data/raw/labels.json``), or None."""
    path = Path(manifest).parent / "labels.json"
    return json.loads(path.read_text()).get("labels_version") if path.is_file() else None
