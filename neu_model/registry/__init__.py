"""MLflow: ``tracking`` (the run of one pipeline pass), ``mlflow_model`` (the pyfunc model),
``lineage`` (the data a run read), ``export_artifacts`` (the exported files logged with a version)
and the ``register`` stage (a new version, the gate, the ``champion`` alias).

May import: ``core``, ``data``, ``model``, ``inference``.
"""
