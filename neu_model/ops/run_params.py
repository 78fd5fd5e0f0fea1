"""A run's overrides in params.yaml, undone when the run ends, and after a kill on the next start.

The training flow writes a run's ``key=value`` overrides into params.yaml, where ``dvc exp run -S``
writes them: it is the file every stage reads and the one DVC compares with ``dvc.lock``, so the
stages see the overrides and dvc.lock records them (docs/reliability.md says why this and not
``dvc exp run --temp``). The file is never left edited:

1. the record (``.dvc/tmp/flow-params.json``: the file before and after) is written first;
2. params.yaml is written; both writes are atomic (a temporary renamed into place);
3. the run puts the file back when it ends (``restore`` in a ``finally``);
4. every entry that changes the workspace calls ``restore`` on start, under the workspace lock,
   so a run killed before step 3 is undone by the next one (``make pipeline`` runs
   ``python -m neu_model.ops.run_params restore`` before ``dvc repro``).

A person's edit wins: the file is put back only while it still holds exactly what the run wrote.

    python -m neu_model.ops.run_params restore
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from neu_model.core.config import ConfigError, apply_overrides, from_dict
from neu_model.core.files import write_json, write_text
from neu_model.core.paths import RUN_PARAMS_RECORD
from neu_model.core.redact import redact_url

log = logging.getLogger("neu_model.ops.run_params")

PARAMS = Path("params.yaml")
# .dvc/tmp: per-workspace scratch that git ignores, like the rest of DVC's run state.
Note = Callable[[str], None]


def _dump_round_trip(text: str, values: dict) -> str:
    """``text`` (a params.yaml) with leaf values from ``values`` written in, comments kept.

    ruamel's round-trip mode is what ``dvc exp run -S`` uses to edit params.yaml.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096  # no re-quoting, no wrapping of the long source URL
    doc = rt.load(text)

    def merge(node, new) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            elif node.get(key) != value:
                node[key] = value

    merge(doc, values)
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def _get(raw: dict, key: str):
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def restore(project: Path | str = ".", note: Note = log.warning, *, ending: bool = False) -> bool:
    """Put params.yaml back as it was before the last run's overrides, if they are still in it.

    Args:
        project: the workspace.
        note: receives one line when something was put back or left.
        ending: the run itself is ending (else: a start finds what a killed run left).

    Returns:
        Whether params.yaml was written.
    """
    params, record = Path(project) / PARAMS, Path(project) / RUN_PARAMS_RECORD
    if not record.exists():
        return False
    try:
        saved = json.loads(record.read_text())
        base, applied = saved["base"], saved["applied"]
    except (ValueError, KeyError, TypeError):
        # Written atomically, so not half-written: someone else's file. params.yaml is left alone.
        note(f"{record}: not a record of this project's runs; removed it, {params} is left as it is")
        record.unlink()
        return False
    current = params.read_text() if params.exists() else None
    what = ", ".join(saved.get("overrides", [])) or "?"
    written = current == applied
    if written:
        write_text(params, base)
        note(f"{params}: this run's overrides ({what}) undone" if ending else
             f"{params}: undid the overrides ({what}) of the run started {saved.get('started', '?')}, "
             f"which ended without undoing them (killed?)")
    elif current != base:
        note(f"{params} was edited after the run with overrides ({what}) wrote it: the edit is kept")
    record.unlink()
    return written


def check(project: Path | str, overrides: Sequence[str]) -> None:
    """Refuse ``overrides`` that params.yaml of ``project`` does not take, before any work.

    Raises:
        ConfigError: an unknown key or a value of the wrong type, named.
    """
    from_dict(apply_overrides(yaml.safe_load((Path(project) / PARAMS).read_text()), overrides))


def apply(project: Path | str, overrides: Sequence[str], note: Note = log.warning) -> list[str]:
    """Write ``overrides`` into params.yaml for one run, recording the file as it was first.

    Whatever an earlier run left is undone first (``restore``). Call ``restore(ending=True)``
    when the run ends.

    Returns:
        The overrides that changed params.yaml (empty when it is left as it is).

    Raises:
        ConfigError: an unknown key or a value the config rejects; params.yaml is untouched.
    """
    params, record = Path(project) / PARAMS, Path(project) / RUN_PARAMS_RECORD
    restore(project, note)
    current = params.read_text()
    old = yaml.safe_load(current)
    raw = apply_overrides(old, overrides)
    from_dict(raw)  # validate before writing anything
    text = _dump_round_trip(current, raw) if overrides else current
    if text == current:
        return []
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    write_json(record, {"base": current, "applied": text, "overrides": [redact_url(o) for o in overrides],
                        "pid": os.getpid(), "started": started})
    write_text(params, text)
    return [o for o in overrides if _get(old, o.partition("=")[0]) != _get(raw, o.partition("=")[0])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["restore"])
    parser.add_argument("--root", default=".", help="the workspace (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        restore(args.root, lambda line: print(f"params: {line}", file=sys.stderr, flush=True))
    except (OSError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
