"""Running the pipeline: ``workspace_lock`` and ``dvc_rwlock`` (one run at a time),
``run_params`` (a run's overrides, undone after), ``orchestrate`` (the stages of ``dvc.yaml`` from
an orchestrator), ``pgserver`` (a local PostgreSQL for the MLflow server), ``sweep``,
``sweep_mlflow``, ``sweep_workspace`` (trials side by side).

May import: every other subpackage. ``flows/`` and ``tasks/`` sit above it.
"""
