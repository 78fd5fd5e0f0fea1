"""Prefect flows: the training pipeline (scheduled retraining) and batch scoring."""
