"""NEU-DET's bounding boxes read from a CSV, VOC files, an archive or a URL, as one table.

The boxes are for evaluating localisation only; nothing is trained on them. A source is a CSV
like ``NEU-DET-boxes.csv`` (``file,label,box_class,xmin,ymin,xmax,ymax``), a folder of Pascal
VOC XML files (``crazing_1.xml`` ...), a .zip/.tar(.gz) archive holding either, or an http(s)
URL of one of those (downloaded with the download stage's retrying fetch into ``data/cache``).
The table is keyed by the NEU-CLS file name: NEU-DET's ``crazing_N``, ``inclusion_N``,
``patches_N``, ``pitted_surface_N``, ``rolled-in_scale_N``, ``scratches_N`` are the NEU-CLS
images ``Cr_N.bmp``, ``In_N.bmp``, ``Pa_N.bmp``, ``PS_N.bmp``, ``RS_N.bmp``, ``Sc_N.bmp``.

Coordinates: the files hold VOC's 1-based, inclusive pixel indices (``xmin=1, xmax=200`` is the
whole width). Scoring uses pixel edges, 0-based: ``[xmin - 1, ymin - 1, xmax, ymax]``, so a box's
area is ``(x1 - x0) * (y1 - y0)`` and a region found on pixels ``r0..r1`` is ``[r0, r1 + 1)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import pandas as pd

from neu_model.core.config import CLASSES, FOLDER_CLASSES
from neu_model.core.stage import StageError
from neu_model.data.archive import open_members
from neu_model.data.fetch import fetch_url

BOX_COLUMNS = ["file", "label", "box_class", "xmin", "ymin", "xmax", "ymax", "width", "height"]
COORDINATES = ["xmin", "ymin", "xmax", "ymax"]
BOX_KEYS = ["file", "box_class", *COORDINATES]  # the columns a box CSV needs
MAX_MEMBER_BYTES = 64 << 20  # an annotation file is a few kB; more is not an annotation
log = logging.getLogger("neu_model.data.neu_det")

_NAME_RE = re.compile(r"^([A-Za-z][A-Za-z_\- ]*?)_0*(\d+)$")  # Cr_1, crazing_1, rolled-in_scale_12


def class_code(name: str) -> str | None:
    """The NEU-CLS code of a class name in either spelling (``rolled-in_scale``, ``RS``), else None."""
    if name in CLASSES:
        return name
    return FOLDER_CLASSES.get(re.sub(r"[\s-]+", "_", name.strip().lower()))


def cls_file_name(name: str) -> str | None:
    """The NEU-CLS file name (``Cr_1.bmp``) of a NEU-DET or NEU-CLS image or annotation name, else None."""
    match = _NAME_RE.match(Path(name).stem)
    code = class_code(match.group(1)) if match else None
    return f"{code}_{int(match.group(2))}.bmp" if code else None


def _check_table(table: pd.DataFrame, shown: str) -> pd.DataFrame:
    """Canonical names and codes, integer coordinates, and boxes with a positive extent."""
    fix = "fix or remove that row"
    for i, row in enumerate(table.itertuples(index=False), start=2):
        if cls_file_name(str(row.file)) is None:
            raise StageError(f"{shown}: row {i}: {row.file!r} is not a NEU-CLS or NEU-DET image name; {fix}")
        if class_code(str(row.box_class)) is None:
            raise StageError(f"{shown}: row {i}: unknown box class {row.box_class!r}; use one of {list(CLASSES)} "
                             f"or the NEU-DET names; {fix}")
    out = table.copy()
    out["file"] = [cls_file_name(str(f)) for f in out["file"]]
    out["label"] = [f.split("_")[0] for f in out["file"]]
    out["box_class"] = [class_code(str(c)) for c in out["box_class"]]
    try:
        out[COORDINATES] = out[COORDINATES].astype(float).round().astype(int)
    except (ValueError, TypeError) as exc:
        raise StageError(f"{shown}: a box coordinate is not a number ({exc}); {fix}") from None
    bad = out[(out.xmin < 1) | (out.ymin < 1) | (out.xmin > out.xmax) | (out.ymin > out.ymax)]
    if len(bad):
        row = bad.iloc[0]
        raise StageError(f"{shown}: box {row[COORDINATES].tolist()} of {row.file} is empty or below 1 "
                         f"(VOC coordinates are 1-based, xmin <= xmax); {fix}")
    for column, default in (("width", 200), ("height", 200)):
        out[column] = out[column].fillna(default).astype(int) if column in out else default
    return out[BOX_COLUMNS].reset_index(drop=True)


def _read_csv(data: bytes | Path, shown: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.BytesIO(data) if isinstance(data, bytes) else data, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise StageError(f"{shown}: not a readable CSV ({str(exc).splitlines()[0]}); "
                         f"give a CSV with columns file,box_class,xmin,ymin,xmax,ymax") from None
    missing = [c for c in BOX_KEYS if c not in table.columns]
    if missing:
        raise StageError(f"{shown}: missing columns {missing}; give a CSV with columns "
                         f"file,box_class,xmin,ymin,xmax,ymax (as NEU-DET-boxes.csv)")
    return table


def _read_voc(data: bytes, shown: str) -> list[dict]:
    """The boxes of one Pascal VOC annotation; the image is named by the XML file's own name."""
    file = cls_file_name(Path(shown.split(":")[-1]).name)
    if file is None:
        raise StageError(f"{shown}: the name is not a NEU-DET annotation name (crazing_1.xml ...); rename it")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise StageError(f"{shown}: not valid XML ({exc}); replace it with a good copy of the annotation") from None
    size = root.find("size")
    width = int(size.findtext("width", "200")) if size is not None else 200
    height = int(size.findtext("height", "200")) if size is not None else 200
    rows = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        try:
            coords = {c: box.findtext(c) for c in COORDINATES} if box is not None else {}
            rows.append({"file": file, "box_class": obj.findtext("name", ""), "width": width, "height": height,
                         **{c: float(v) for c, v in coords.items()}})
        except (TypeError, ValueError):
            raise StageError(f"{shown}: an object without numeric bndbox xmin/ymin/xmax/ymax; "
                             f"fix or replace the annotation") from None
    return rows


def _from_members(members: Iterable[tuple[str, bytes]], shown: str) -> pd.DataFrame:
    """Boxes from (name, bytes) pairs of a folder or archive.

    An .xml named like a NEU-DET annotation (``crazing_1.xml``) is one VOC annotation, a .csv with
    the box columns a box table; other files (a repository's own XML or CSV) are skipped and counted.
    """
    tables, rows, skipped = [], [], []
    for name, data in members:
        where, low = f"{shown}:{name}" if shown else name, name.lower()
        if low.endswith(".xml") and cls_file_name(PurePosixPath(name).name) is not None:
            rows += _read_voc(data, where)
        elif low.endswith(".csv") and set(BOX_KEYS) <= set(data.split(b"\n", 1)[0].decode(errors="replace")
                                                           .strip().split(",")):
            tables.append(_read_csv(data, where))
        else:
            skipped.append(name)
    if skipped:
        log.info("%s: skipped %d files that are no NEU-DET annotation (e.g. %s)", shown, len(skipped), skipped[0])
    if rows:
        tables.append(pd.DataFrame(rows))
    if not tables:
        raise StageError(f"{shown}: no NEU-DET annotations (crazing_1.xml ...) or box CSV found; point data.boxes (or "
                         f"NEU_BOXES_SOURCE) at the NEU-DET annotations (a folder, an archive or NEU-DET-boxes.csv)")
    return pd.concat(tables, ignore_index=True)


def _archive_members(archive: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of the plain .xml/.csv members, read in memory; names pass the download
    stage's path check, and links, devices and members over ``MAX_MEMBER_BYTES`` are refused."""
    wanted = (".xml", ".csv")
    fix = "point data.boxes (or NEU_BOXES_SOURCE) at a CSV, folder, zip or tar archive of box annotations"
    with open_members(archive, archive.parent, fix) as members:
        found = []
        for m in members:
            if m.kind == "dir" or not m.parts or not m.parts[-1].lower().endswith(wanted) or "__MACOSX" in m.parts:
                continue
            if m.kind != "file" or m.size > MAX_MEMBER_BYTES:
                raise StageError(f"{archive}: member {m.name!r} is not a plain file under {MAX_MEMBER_BYTES >> 20} "
                                 f"MB; pack the annotation files themselves")
            with m.open() as fh:
                found.append((m.name, fh.read(MAX_MEMBER_BYTES + 1)))
        return found


def read_boxes(source: str | Path, cache_dir: Path = Path("data/cache")) -> pd.DataFrame:
    """Read NEU-DET boxes from a CSV, a folder of VOC XML files, an archive or an http(s) URL.

    Returns:
        One row a box: file (NEU-CLS name), label (the image's class), box_class (the box's class
        code; it may differ from label), xmin, ymin, xmax, ymax (VOC, 1-based inclusive), width, height.

    Raises:
        StageError: a missing, unreadable or malformed source, naming the file and the fix.
    """
    text = str(source)
    if re.match(r"^https?://", text, re.IGNORECASE):
        low = text.lower().split("?")[0]
        ext = next((e for e in (".tar.gz", ".tgz", ".tar", ".zip", ".csv") if low.endswith(e)), ".archive")
        path = Path(cache_dir) / (hashlib.sha256(text.encode()).hexdigest() + ext)
        if not path.exists():
            fetch_url(text, path)
    else:
        path = Path(source).expanduser()
    if path.is_dir():
        xmls = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".xml", ".csv") and p.is_file())
        table = _from_members(((p.relative_to(path).as_posix(), p.read_bytes()) for p in xmls), str(source))
    elif path.is_file() and path.suffix.lower() == ".csv":
        table = _read_csv(path, str(source))
    elif path.is_file():
        table = _from_members(_archive_members(path), str(source))
    else:
        raise StageError(f"{source}: no such file or folder; fix data.boxes or NEU_BOXES_SOURCE (a CSV, a "
                         f"folder of VOC XML files or an archive of them)")
    return _check_table(table, str(source))
