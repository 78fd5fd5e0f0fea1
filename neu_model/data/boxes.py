"""DVC stage ``boxes``: NEU-DET's bounding boxes as ``data/boxes.csv``, for the evaluate stage's
localisation figures (nothing is trained on them).

The source is ``data.boxes`` in params.yaml, or the ``NEU_BOXES_SOURCE`` environment variable
when set: an http(s) URL of a .zip/.tar(.gz) of the NEU-DET annotations (or of a box CSV), a
local archive, a folder of Pascal VOC files or a box CSV such as ``NEU-DET-boxes.csv``
(``neu_model.data.neu_det.read_boxes``). ``data/boxes.csv`` holds one row a box, ``read_boxes``'s
normalised table; with no source it holds the header alone and evaluate skips the figures.

The source stage fingerprints the box source on every ``dvc repro`` (an environment variable
is invisible to DVC) into ``data/boxes_source.json``; this stage depends on that file, so it runs
when the boxes changed. ``data/boxes.csv`` is rewritten only when its content changed
(its modification time is kept otherwise), so evaluate reruns only on a real change. A URL is
downloaded into a temporary folder that is removed afterwards. Credentials in a URL are never
shown (``neu_model.core.redact``).

    python -m neu_model.data.boxes [--out data/boxes.csv]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

from neu_model.core.config import add_config_args, load_config
from neu_model.core.files import write_text
from neu_model.core.paths import BOXES_FILE
from neu_model.core.redact import install_log_redaction, redact_url, split_credentials
from neu_model.core.stage import StageError, run_stage
from neu_model.data.fetch import READ_TIMEOUT, RETRY_DELAYS, fetch_url
from neu_model.data.neu_det import BOX_COLUMNS, read_boxes

log = logging.getLogger("neu_model.data.boxes")

NO_SOURCE = ("no box source: localisation metrics will be skipped; to get them, set data.boxes in params.yaml "
             "or NEU_BOXES_SOURCE to the NEU-DET annotations (a URL, an archive, a folder of VOC files or a box CSV)")
FIX = "fix data.boxes in params.yaml or NEU_BOXES_SOURCE"
URL_EXTENSIONS = (".tar.gz", ".tgz", ".tar", ".zip", ".csv")


def box_table(source: str | None, work_dir: Path = BOXES_FILE.parent, retry_delays: Sequence[float] = RETRY_DELAYS,
              read_timeout: float = READ_TIMEOUT) -> pd.DataFrame:
    """The boxes of ``source``, one row a box, in a fixed order; an empty table for no source.

    Args:
        source: a URL, archive, folder or CSV (``data.boxes``), or None.
        work_dir: where a URL's download is kept while it is read.
        retry_delays: seconds before each retry of a failed download.
        read_timeout: seconds a server may stay silent.

    Raises:
        StageError: a source that cannot be read or holds no valid annotation, naming it and the
            fix; never the credentials of a URL.
    """
    if not source:
        return pd.DataFrame(columns=BOX_COLUMNS)
    if re.match(r"^https?://", source, re.IGNORECASE):
        table = _from_url(source, work_dir, retry_delays, read_timeout)
    elif "://" in source:
        raise StageError(f"{redact_url(source)}: unsupported URL scheme; use http(s)://, an archive, a folder or a "
                         f"CSV; {FIX}")
    else:
        table = read_boxes(source)
    # The same boxes give the same bytes whatever the order of the source's files or rows.
    return table.sort_values(["file", "box_class", "xmin", "ymin", "xmax", "ymax"], kind="stable",
                             ignore_index=True)


def _from_url(url: str, work_dir: Path, retry_delays: Sequence[float], read_timeout: float) -> pd.DataFrame:
    """Download ``url`` into a temporary folder in ``work_dir`` and read it; the folder goes afterwards."""
    shown = redact_url(url)
    low = split_credentials(url)[0].lower().split("?")[0]
    ext = next((e for e in URL_EXTENSIONS if low.endswith(e)), ".archive")  # read_boxes tells CSV by the name
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".boxes-tmp-", dir=work_dir) as tmp:
        path = Path(tmp) / f"boxes{ext}"
        try:
            fetch_url(url, path, retry_delays, read_timeout)
            return read_boxes(path)
        except StageError as exc:
            # The fetch helper's advice names the image source's settings; here the boxes' are meant.
            text = str(exc).replace(str(path), shown).replace("NEU_DATA_SOURCE", "NEU_BOXES_SOURCE")
            raise StageError(redact_url(text.replace("data.source", "data.boxes"))) from None


def write_if_changed(table: pd.DataFrame, out: Path = BOXES_FILE) -> bool:
    """Write ``table`` as CSV to ``out`` unless ``out`` holds exactly that already; returns whether it wrote.

    An unchanged file is left alone, modification time included: DVC then sees no change.
    """
    data = table[BOX_COLUMNS].to_csv(index=False, lineterminator="\n").encode()
    if out.is_file() and out.read_bytes() == data:
        return False
    write_text(out, data.decode())
    return True


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--out", type=Path, default=BOXES_FILE, help=f"output CSV (default: {BOXES_FILE})")
    return parser


def main(argv: Sequence[str] | None = None) -> bool:
    """Run the stage; returns whether the output changed."""
    install_log_redaction()  # run_stage has set up logging: every line passes redact_url
    args = get_args_parser().parse_args(argv)
    source = load_config(args.params, args.overrides).data.boxes
    table = box_table(source, args.out.parent)
    changed = write_if_changed(table, args.out)
    if not source:
        log.info(NO_SOURCE)
    elif table.empty:
        log.warning("%s holds no boxes: localisation metrics will be skipped; %s", redact_url(source), FIX)
    else:
        log.info("%d boxes of %d images from %s: %s", len(table), table["file"].nunique(), redact_url(source),
                 "changed, the evaluate stage will run" if changed else "unchanged")
    return changed


if __name__ == "__main__":
    sys.exit(run_stage(main))
