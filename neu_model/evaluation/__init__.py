"""The ``evaluate`` stage and what it reports: ``metrics``, ``prediction_table``,
``figures`` (confusion matrix, gallery, training curves), ``localisation`` (box figures),
``unknown_report`` and ``unknown_metrics`` (the unknown-input flag on steel and non-steel tiles).

May import: ``core``, ``data``, ``model``, ``localisation``, ``inference``, ``registry``.
"""
