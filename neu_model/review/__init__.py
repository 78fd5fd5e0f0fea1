"""Reviewing what ``neu-predict`` flagged, and turning the answers into a data version.

``neu-review serve`` (``server``, over ``session`` and ``queue``) shows the flagged tiles of
prediction CSVs one at a time on a local web page and records every decision in an append-only
audit log (``auditlog``); ``neu-review commit`` (``commit``, ``publish``) writes the final labels
as PNGs into ``labels/``, versions the folder with DVC and git, and announces it to Prefect.
``tiles`` reads a tile's pixels back from the image the model scored; ``cli`` is the command.

May import: ``core``, ``data``, ``inference``. Never ``training``, ``evaluation``, ``registry``
or ``ops``: reviewing runs on a line PC beside ``neu-predict``, without the training stack.
"""
