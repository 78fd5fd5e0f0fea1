"""The registry's history: versions, aliases, the gate's figures and the promotion history (``make registry``)."""

from __future__ import annotations

import datetime as dt

from neu_model.core.stage import StageError


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
             "labels_version": m.tags.get("labels_version"),
             "public": _figure(m.tags, "public"), "plant": _figure(m.tags, "plant"),
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


def _figure(tags: dict, origin: str) -> str | None:
    """``0.9981 (540)``: a version's test accuracy on one set and its image count; None before sets."""
    n, accuracy = tags.get(f"test_images_{origin}"), tags.get(f"test_accuracy_{origin}")
    if n is None:
        return None
    return f"{float(accuracy):.4f} ({n})" if accuracy not in (None, "None") else f"- ({n})"


def _ms(stamp: int | None) -> str:
    return dt.datetime.fromtimestamp((stamp or 0) / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def format_listing(data: dict) -> str:
    """The listing as plain text for a terminal."""
    lines = [f"registered model {data['model_name']}  aliases: "
             + ", ".join(f"{a}=v{v}" for a, v in sorted(data["aliases"].items())), "",
             f"{'ver':>4}  {'aliases':<20} {'model':<10} {'accuracy':>8}  {'public test':<14} {'plant test':<14} "
             f"{'dataset':<12} {'labels':<12} {'split':<12} {'decision':<9} run"]
    for r in data["versions"]:
        lines.append(f"{r['version']:>4}  {','.join(r['aliases']) or '-':<20} {r['model'] or '?':<10} "
                     f"{r['test_accuracy'] or '?':>8}  {r['public'] or '?':<14} {r['plant'] or '?':<14} "
                     f"{r['dataset_version'] or '?':<12} {r['labels_version'] or '?':<12} "
                     f"{r['test_split_id'] or '?':<12} {r['decision'] or '-':<9} {r['run_id']}")
    lines += ["", "promotion history:"]
    for h in data["history"]:
        old = f"v{h['replaced']} ({h['replaced_accuracy'] or '?'} on the same split)" if h["replaced"] else "none"
        lines.append(f"  {h['at']}  v{h['version']} ({h['test_accuracy']}) replaced {old}")
    if not data["history"]:
        lines.append("  (none)")
    return "\n".join(lines)
