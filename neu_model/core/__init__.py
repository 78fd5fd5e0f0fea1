"""The ground floor: what every other subpackage shares, and nothing of the model.

``config`` (params.yaml as frozen dataclasses, built by ``schema``), ``paths`` (every file the
stages read or write, by name), ``stage`` (one-line errors and quiet telemetry of every
``python -m`` entry), ``store`` (which MLflow store), ``files`` (crash-safe writes), ``redact``
(credentials out of messages), ``progress``, ``provenance`` (git commit, dataset version).

May import: the standard library, numpy, pyyaml. Imports no other ``neu_model`` subpackage,
no torch, MLflow, pandas or matplotlib at import time.
"""
