"""The ``evaluate`` stage and what it reports: ``metrics``, ``prediction_table``,
``figures`` (confusion matrix, gallery, training curves), ``localisation`` (box figures).

May import: ``core``, ``data``, ``model``, ``localisation``, ``inference``, ``registry``.
"""
