"""What ``make pipeline`` prints last: the run in a few lines a person reads in five seconds.

    python -m neu_model.ops.summary [--project .]

Accuracy and errors, robustness, the review share, localisation, the unknown-input flag, export
parity and the registry's decision, from the reports the stages wrote. The full table stays one command away:
``dvc metrics show``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neu_model.core import paths


def _read(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _pct(value: Any, digits: int = 1) -> str:
    return f"{100 * float(value):.{digits}f} %" if isinstance(value, (int, float)) else "n/a"


def localisation_line(loc: Mapping[str, Any]) -> str:
    if not loc or "skipped" in loc:
        return f"localisation  {loc.get('skipped', 'not measured') if loc else 'not measured'}"
    chosen = loc.get("chosen", "")
    figures = loc.get("methods", {}).get(chosen, {})
    return (f"localisation  {chosen}: box accuracy {_pct(figures.get('box_accuracy'))}, recall "
            f"{_pct(figures.get('recall'))}, precision {_pct(figures.get('precision'))}, pointing "
            f"{_pct(figures.get('pointing'))}")


def unknown_line(unknown: Mapping[str, Any]) -> str:
    if not unknown or "skipped" in unknown:
        return f"unknown       {unknown.get('skipped', 'not measured') if unknown else 'not measured'}"
    corrupted = (f", corrupted steel {_pct(unknown['corrupted_flagged_share'])}"
                 if "corrupted_flagged_share" in unknown else "")
    return (f"unknown       {unknown.get('method')}: non-steel flagged {_pct(unknown.get('non_steel_flagged_share'))} "
            f"(AUROC {unknown.get('auroc', float('nan')):.3f}), test images {_pct(unknown.get('test_flagged_share'))}"
            f"{corrupted}")


def export_line(export: Mapping[str, Any]) -> str:
    variants = export.get("variants", {})
    if not variants:
        return "export        not run"
    parity = [f"{name} {entry['max_prob_diff']:.1e}" for name, entry in variants.items()
              if entry.get("precision") == "fp32" and "max_prob_diff" in entry]
    dropped = [name for name, entry in variants.items() if not entry.get("kept")]
    kept = [name for name, entry in variants.items() if entry.get("kept")]
    return (f"export        kept {', '.join(kept) or 'none'}" + (f"; dropped {', '.join(dropped)}" if dropped else "")
            + (f"; max probability diff {', '.join(parity)}" if parity else ""))


def sets_phrase(sets: Mapping[str, Any]) -> str:
    """``; public 100.00 % of 540, plant 75.00 % of 4``: the two test sets (evaluate's test_sets)."""
    parts = [f"{name} {_pct(s['accuracy'], 2) if s.get('images') else '-'} of {s.get('images', 0)}"
             for name, s in sets.items()]
    return "; " + ", ".join(parts) if parts else ""


def registry_line(registration: Mapping[str, Any]) -> str:
    if not registration:
        return "registry      no decision recorded"
    decision = registration.get("decision", "?")
    version = registration.get("version", "?")
    reason = (registration.get("reasons") or [""])[-1]
    return f"registry      version {version} {decision}; champion: {registration.get('champion')} ({reason})"


def summary_lines(project: Path = Path(".")) -> list[str]:
    """The summary of the reports under ``project``."""
    metrics = _read(project / paths.METRICS_FILE)
    review, robustness = metrics.get("review", {}), metrics.get("robustness", {})
    n_test = metrics.get("n_test", "?")
    return [
        f"test          accuracy {_pct(metrics.get('accuracy'), 2)}, {metrics.get('errors', '?')} errors of "
        f"{n_test} images ({metrics.get('model', '?')}){sets_phrase(metrics.get('test_sets', {}))}",
        f"robustness    mean accuracy {_pct(robustness.get('mean_accuracy'), 2)} over the corrupted copies"
        if robustness else "robustness    not measured",
        f"review        {review.get('flagged', '?')} of {n_test} flagged ({_pct(review.get('flagged_share'))}) "
        f"below confidence {review.get('below_confidence', '?')}; {review.get('accepted_errors', '?')} errors "
        "accepted unseen",
        localisation_line(metrics.get("localisation", {})),
        unknown_line(metrics.get("unknown", {})),
        export_line(_read(project / paths.EXPORT_REPORT)),
        registry_line(_read(project / paths.REGISTRATION_FILE)),
        "all figures: dvc metrics show",
    ]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="the checkout (default: here)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    print("\n".join(summary_lines(args.project)), file=sys.stdout)


if __name__ == "__main__":
    main()
