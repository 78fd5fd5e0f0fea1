"""Thin Prefect tasks over ``neu_model``: each runs one step and logs through Prefect."""
