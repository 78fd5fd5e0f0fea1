"""The text of the flows' Prefect artifacts: plain functions of the run summary, easy to test.

Artifacts are stored by the Prefect server and shown to anyone with access to it, so the
credentials of any URL in them are masked (``neu_model.core.redact``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from neu_model.core.config import CLASS_NAMES, CLASSES
from neu_model.core.redact import redact_url


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "n/a"


def decision_text(registration: Mapping[str, Any]) -> tuple[str, str]:
    """The registry decision and its reason from reports/registration.json, as two strings."""
    if not registration:
        return "no registry decision recorded", "reports/registration.json is missing"
    promoted = registration.get("promoted")
    decision = registration.get("decision") or (
        "promoted to champion" if promoted else "not promoted" if promoted is not None else "unknown")
    version = registration.get("version")
    name = registration.get("model_name") or registration.get("name")
    if name and version is not None:
        decision = f"{decision} ({name} v{version})"
    if registration.get("champion"):
        decision = f"{decision}; champion is now v{registration['champion']}"
    reasons = registration.get("reasons") or registration.get("reason") or "no reason given"
    return str(decision), "; ".join(reasons) if isinstance(reasons, list) else str(reasons)


def per_class_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class: precision, recall, F1 and support from reports/metrics.json."""
    per_class = metrics.get("per_class", {})
    keys = ("precision", "recall", "f1", "support")
    return [{"class": c, "name": CLASS_NAMES[c], **{k: per_class[c].get(k) for k in keys}}
            for c in CLASSES if c in per_class]


def review_lines(review: Mapping[str, Any] | None) -> list[str]:
    """What the review threshold did on the test images (nothing for metrics without it)."""
    if not review:
        return []
    return [f"- review below {review['below_confidence']:.2f} confidence: {review['flagged']} test images flagged "
            f"({_pct(review['flagged_share'])}), {review['accepted_errors']} errors accepted unseen "
            f"(In↔PS {review['accepted_in_ps_errors']})"]


def training_markdown(summary: Mapping[str, Any], ran: Mapping[str, bool], changed_params: Sequence[str],
                      new_data: bool, mlflow_link: str | None, failed: str | None = None,
                      overrides: Sequence[str] = ()) -> str:
    """The training flow's summary artifact, with the credentials of any URL in it masked."""
    metrics, train, run = summary.get("metrics", {}), summary.get("train", {}), summary.get("run", {})
    decision, reason = decision_text(summary.get("registration", {}))
    trained = ran.get("train", False)
    if failed:
        headline = f"**Failed:** {failed}"
    elif not any(ran.values()):
        headline = "**No change:** every stage was up to date; nothing was trained or registered."
    else:
        headline = f"**Ran:** {', '.join(s for s, r in ran.items() if r)}."
    lines = [
        "# NEU-CLS training run", "", headline, "",
        f"- data source: `{summary.get('data_source', 'unknown')}` ({'new data' if new_data else 'unchanged'})",
        f"- dataset version: `{summary.get('dataset_version', 'unknown')}`",
        f"- overrides for this run: {', '.join(f'`{p}`' for p in overrides) or 'none'}"
        f" ({len(changed_params)} changed params.yaml)",
        f"- model: `{metrics.get('model') or train.get('model', 'unknown')}` on {train.get('device', 'unknown')}, "
        f"{train.get('epochs', '?')} epochs (best {train.get('best_epoch', '?')})"
        + ("" if trained else " (the current model, trained by an earlier run)"),
        f"- test accuracy: **{_pct(metrics.get('accuracy'))}**, macro-F1 {_pct(metrics.get('macro_f1'))}"
        f" on {metrics.get('n_test', '?')} images",
        *review_lines(metrics.get("review")),
        f"- promotion: **{decision}**" + ("" if ran.get("register") else " (recorded by an earlier run)"),
        f"- why: {reason}",
        f"- MLflow run: [{run.get('run_id')}]({mlflow_link})" if mlflow_link else "- MLflow run: none recorded",
        "", "| class | F1 | precision | recall | support |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['class']} ({r['name']}) | {_pct(r['f1'])} | {_pct(r['precision'])} | {_pct(r['recall'])} "
              f"| {r['support']} |" for r in per_class_rows(metrics)]
    return redact_url("\n".join(lines) + "\n")


def scoring_markdown(summary: Mapping[str, Any], model_uri: str, out: str) -> str:
    """The scoring flow's summary artifact: counts per class and the least confident images."""
    lines = [
        "# NEU-CLS batch scoring", "",
        f"- model: `{model_uri}`", f"- images scored: {summary['n']}", f"- predictions: `{out}`", "",
        "| class | images |", "|---|---|",
        *[f"| {c} ({CLASS_NAMES[c]}) | {n} |" for c, n in summary["counts"].items()],
        "", f"Need review (confidence below the threshold, or unknown input): **{summary['needs_review']}**, "
        f"of them unknown input (not NEU steel): **{summary.get('unknown', 0)}**", "",
        "Least confident (check these first):", "", "| file | predicted | confidence |", "|---|---|---|",
        *[f"| `{r['file']}` | {r['predicted']} | {_pct(r['confidence'])} |" for r in summary["least_confident"]],
    ]
    return "\n".join(lines) + "\n"
