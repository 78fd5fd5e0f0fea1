"""Classify steel-surface images: one CSV row per 200x200 tile, by the registry's champion or a saved model.

    neu-predict IMAGES_FOLDERS_OR_ARCHIVES ... [--out predictions.csv] [--model models/model.pt]
                [--runtime auto] [--locate] [--overlays DIR] [--map DIR]
    python -m neu_model.inference.predict ...                                   (the same command)

Inputs: image files (.bmp .png .jpg .tif, any bit depth; colour is read as luminance), folders
(recursive) and .zip / .tar / .tar.gz archives, in any mix; archive members are named
``<archive>:<member>``. An image larger than 200x200 is cut into tiles ``--stride`` pixels apart
(default 200: side by side), the last row and column flush with its border.

The CSV (stdout, or ``--out`` written atomically) has the columns
``file,x,y,predicted,confidence,needs_review,p_Cr,p_In,p_Pa,p_PS,p_RS,p_Sc,error``: x, y are the
tile's top-left pixel; a file that cannot be read gets one row whose ``error`` says why, and
everything else is still scored. ``needs_review`` is true below ``review.below_confidence``
(``--review-below``). With ``--out FILE`` a sidecar ``FILE.model.json`` names the model that
wrote it (``models:/<name>/<version>`` with the alias resolved, or the file), its runtime and
the review threshold: ``neu-review`` shows it beside every tile.

``--locate`` adds a ``boxes`` column: per tile a JSON list ``[[x0, y0, x1, y1, score], ...]``,
best first, of where its predicted class's defect is, in the whole image's pixels (x1, y1
exclusive); the score is the region's summed evidence, comparable between boxes of one method.
``--overlays DIR`` (implies --locate) writes one PNG per image: heat map, boxes, each tile's
class. ``--runtime`` chooses what runs the model (see its help).

Exit status: 0 every file scored, 1 some files unreadable (their error rows), 2 a usage error
(a missing path, a bad option, an unknown or unavailable runtime, no model).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neu_model.core.config import CLASSES, load_config
from neu_model.core.files import atomic_path, write_json
from neu_model.core.paths import PARAMS_FILE
from neu_model.core.stage import StageError, run_stage
from neu_model.inference.console import ImageReport
from neu_model.inference.loading import RUNTIME_NAMES, LoadedModel, load_model
from neu_model.inference.predictors import Predictor, scored_probabilities
from neu_model.inference.registry_files import NO_CHAMPION_FIX, NO_VERSION_FIX, champion_uri
from neu_model.inference.tiles import (
    CSV_COLUMNS,
    LOCATE_COLUMN,
    TILE_SIZE,
    Batch,
    ReadError,
    TileStream,
    error_row,
    with_progress,
)

Scored = tuple[Batch | ReadError, list[dict]]


def tile_rows(batch: Batch, probs: np.ndarray, review_below: float, scores: np.ndarray | None = None,
              threshold: float | None = None) -> list[dict]:
    """The CSV rows of one batch of tiles, its (B, classes) probabilities and its unknown scores
    (None: the model has no statistics, the two columns stay empty)."""
    confidence, best = probs.max(axis=1), probs.argmax(axis=1)
    unknown = [None] * len(probs) if scores is None or threshold is None else list(scores > threshold)
    return [{"file": file, "x": batch.xs[i], "y": batch.ys[i], "predicted": CLASSES[best[i]],
             "confidence": round(float(confidence[i]), 6),
             "needs_review": bool(confidence[i] < review_below or unknown[i]),
             **{f"p_{c}": round(float(probs[i, j]), 6) for j, c in enumerate(CLASSES)},
             "unknown_score": "" if unknown[i] is None else round(float(scores[i]), 6),
             "unknown": "" if unknown[i] is None else bool(unknown[i]), "error": ""}
            for i, file in enumerate(batch.files)]


def scored(items: Iterable[Batch | ReadError], model: Predictor, review_below: float) -> Iterator[Scored]:
    """Each item of a TileStream with its rows: tiles classified by ``model``, errors as error rows."""
    threshold = getattr(model, "unknown_threshold", None)
    for item in items:
        if isinstance(item, ReadError):
            yield item, [error_row(item)]
        else:
            probs, scores = scored_probabilities(model, item.tiles)
            yield item, tile_rows(item, probs, review_below, scores, threshold)


def rows_frame(rows: Iterable[dict], columns: Sequence[str] = CSV_COLUMNS) -> pd.DataFrame:
    """Rows as a DataFrame with typed columns: x, y nullable integers, probabilities floats (NaN on
    error rows), so that ``to_csv`` writes what the streaming writer writes."""
    frame = pd.DataFrame.from_records(list(rows), columns=list(columns))
    for column in ("x", "y"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in ["confidence", *(f"p_{c}" for c in CLASSES)]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["needs_review"] = frame["needs_review"].astype(bool)
    frame["unknown_score"] = pd.to_numeric(frame["unknown_score"], errors="coerce")
    frame["unknown"] = frame["unknown"].map({True: True, False: False}).astype("boolean")
    return frame


def score_inputs(inputs: Sequence[Path | str], model: Predictor, review_below: float, batch_size: int = 64,
                 stride: int = TILE_SIZE) -> pd.DataFrame:
    """Classify every tile of ``inputs`` (files, folders, .zip/.tar(.gz) archives) with ``model``.

    Args:
        model: anything with the pyfunc contract: float32 (N, 1, 200, 200) in [0, 1] in,
            (N, 6) probabilities out (a registry model, ``runtime_choice.load_predictor``'s).
        review_below: ``needs_review`` marks the tiles less confident than this.

    Returns:
        One row per tile, one per unreadable file, in the columns of ``reader.CSV_COLUMNS``.

    Raises:
        StageError: a missing input, no images at all, or a model answering in another shape.
    """
    stream = TileStream(list(inputs), batch_size=batch_size, stride=stride)
    return rows_frame(row for _, rows in scored(with_progress(stream), model, review_below) for row in rows)


def tile_counts(frame: pd.DataFrame, n_least: int = 10) -> dict:
    """Tiles per predicted class (every class listed), how many need review (error rows
    included) and how many of them are unknown input, unreadable files, and the ``n_least`` least
    confident tiles."""
    counts = frame["predicted"].value_counts()
    least = frame.dropna(subset=["confidence"]).nsmallest(n_least, "confidence")[["file", "predicted", "confidence"]]
    errors = int((frame["error"].fillna("") != "").sum()) if "error" in frame else 0
    return {"n": len(frame), "counts": {c: int(counts.get(c, 0)) for c in CLASSES},
            "needs_review": int(frame["needs_review"].sum()), "errors": errors,
            "unknown": int((frame["unknown"].astype(str) == "True").sum()) if "unknown" in frame else 0,
            "least_confident": least.to_dict("records")}


@contextlib.contextmanager
def csv_sink(out: Path | None, columns: Sequence[str]) -> Iterator[csv.DictWriter]:
    """A CSV writer with its header written: to stdout, or to ``out`` through a temporary file
    renamed when the block ends without an error (rows stream out; none are held)."""
    if out is None:
        writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
        writer.writeheader()
        yield writer
        sys.stdout.flush()
        return
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, lineterminator="\n")
        writer.writeheader()
        yield writer


def write_model_sidecar(out: Path, model: LoadedModel, review_below: float) -> Path:
    """``<out>.model.json`` (atomically): the model, runtime and threshold that wrote the CSV ``out``."""
    sidecar = out.with_name(f"{out.name}.model.json")
    write_json(sidecar, {"model": model.source or "unknown", "runtime": model.runtime, "review_below": review_below,
                         "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return sidecar


def unit_interval_arg(what: str, hint: str) -> Callable[[str], float]:
    """An ``argparse`` type: a number in [0, 1], else a one-line usage error naming ``what`` it is."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what} in [0, 1] ({hint})")
        return value

    return parse


confidence_arg = unit_interval_arg("confidence", "0 flags nothing, 1 everything")  # --review-below


def add_review_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--review-below CONFIDENCE`` (default None: see ``review_threshold``)."""
    parser.add_argument("--review-below", type=confidence_arg, metavar="CONFIDENCE",
                        help="flag predictions less confident than this (default: review.below_confidence)")


def review_threshold(review_below: float | None, params: Path = PARAMS_FILE) -> float:
    """``review_below`` when given, else ``review.below_confidence`` of ``params``."""
    return load_config(params).review.below_confidence if review_below is None else review_below


def positive_int(text: str) -> int:
    """``argparse`` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def stride_arg(text: str) -> int:
    """``argparse`` type of ``--stride``: pixels from 1 to the tile size."""
    value = positive_int(text)
    if value > TILE_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is above the tile size {TILE_SIZE}: pixels between tiles "
                                         "would never be seen")
    return value


RUNTIME_HELP = (f"what runs the model: {', '.join(RUNTIME_NAMES)} (default auto). auto: for a models:/ URI the "
                "fastest on this machine of torch and the runtimes its export kept (timed once per version and "
                "machine; torch on a GPU; pyfunc for a version registered without exported files); for a .pt "
                "file torch (the file named is the file run: onnx, openvino, ... use the .onnx files beside it); "
                "for a .onnx file onnx")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neu-predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="image files, folders, .zip or .tar(.gz) archives")
    parser.add_argument("--model", help="a models:/ URI, a models/model.pt file or an exported .onnx file "
                                        "(default: models:/<register.model_name>@champion)")
    parser.add_argument("--runtime", default="auto", help=RUNTIME_HELP)
    parser.add_argument("--device", default="auto", help="for torch: auto, cpu, cuda, mps (default auto)")
    parser.add_argument("--out", type=Path, help="write the CSV here (atomically) instead of stdout")
    parser.add_argument("--stride", type=stride_arg, help=f"pixels between tiles, 1 to {TILE_SIZE} "
                                                          "(default 200)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="tiles per model call (default 64)")
    parser.add_argument("--map", type=Path, metavar="DIR", help="write a strip map PNG here for every image "
                                                                "larger than one tile")
    parser.add_argument("--locate", action="store_true",
                        help="add a boxes column: where each tile's defect is, for its predicted class (the "
                             "locate: params, else the built-in defaults; an .onnx model alone gets the classical "
                             "method)")
    parser.add_argument("--overlays", type=Path, metavar="DIR",
                        help="write a PNG per image here: heat map, boxes, each tile's class (implies --locate)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    add_review_arg(parser)
    return parser


def open_model(args: argparse.Namespace, cfg) -> LoadedModel:
    """The model of ``--model`` (default the champion) in ``--runtime``; says on stderr what auto chose."""
    spec = args.model or champion_uri(params=args.params)
    mirror = bool(getattr(getattr(cfg, "inference", None), "mirror", False))
    model = load_model(spec, args.runtime, args.device, mirror, NO_VERSION_FIX if args.model else NO_CHAMPION_FIX)
    if model.note:
        print(f"{spec}: {model.note}", file=sys.stderr)
    return model


def check_folders(args: argparse.Namespace) -> None:
    """--map and --overlays name their PNGs alike: one folder for both would overwrite maps."""
    if args.map is not None and args.overlays is not None and args.map.resolve() == args.overlays.resolve():
        raise StageError(f"--map and --overlays both name {args.map}: their PNGs share names; give two folders")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the number of unreadable files."""
    args = get_args_parser().parse_args(argv)
    check_folders(args)
    cfg = load_config(args.params)
    review_below = cfg.review.below_confidence if args.review_below is None else args.review_below
    stream = TileStream(args.inputs, batch_size=args.batch_size, stride=args.stride or TILE_SIZE,
                        keep_images=args.map is not None or args.overlays is not None)
    model = open_model(args, cfg)
    locator = overlays = None
    if args.locate or args.overlays is not None:
        # Imported here: scoring alone needs neither the localisation nor the drawing code.
        from neu_model.inference.tile_boxes import TileLocator, locate_batch, locate_params

        locator = TileLocator(model.load_network() if model.load_network else None, locate_params(cfg),
                              args.batch_size)
        if locator.note:
            print(locator.note, file=sys.stderr)
    if args.overlays is not None:
        from neu_model.inference.overlays import OverlayWriter

        overlays = OverlayWriter(args.overlays)
    columns = [*CSV_COLUMNS, LOCATE_COLUMN] if locator else list(CSV_COLUMNS)
    report = ImageReport(args.map)
    with csv_sink(args.out, columns) as sink:
        for item, rows in scored(with_progress(stream), model.predictor, review_below):
            if locator and isinstance(item, Batch):
                locate_batch(item, rows, locator, overlays)
            report.add(item, rows)
            sink.writerows(rows)
    if args.out is not None:
        write_model_sidecar(args.out, model, review_below)
    if overlays is not None:
        overlays.close()
    report.close(args.out, overlays.written if overlays else None)
    return report.errors


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``neu-predict`` console script: exit status 0 all scored, 1 unreadable files, 2 usage errors."""
    unreadable: list[int] = []
    status = run_stage(lambda a: unreadable.append(main(a)), argv)
    return status or (1 if unreadable and unreadable[0] else 0)


if __name__ == "__main__":
    sys.exit(cli())
