"""Where the defect is: ``regions`` (heat maps to scored boxes), ``cam`` (Grad-CAM and
LayerCAM), ``geometry`` (IoU, matches and pointing of boxes), ``methods`` (the locate methods
and their settings), ``gallery`` (the evaluate stage's figure of them).

May import: ``core``, ``data``, ``model``.
"""
