"""Kill points for tests/test_kills.py and friends, installed into a child process from outside.

A test that wants a stage killed at an exact moment starts it with this folder on PYTHONPATH
and ``NEU_PAUSE_AT=<point>`` (``kill_support.Watched``); Python imports this file at start-up,
and the process prints ``NEU_PAUSE_AT reached: <point>`` and waits there to be killed. The
production code carries no hook: the points are the library calls it makes anyway.

Points:
- ``rename:<name>`` / ``renamed:<name>``: before / after ``os.replace`` onto a file called
  ``<name>`` (every atomic write ends with one).
- ``swap:<folder>`` / ``swapped:<folder>``: before / after ``replace_dir`` exchanges a folder.
- ``register:version-created``: after MLflow created a model version;
  ``register:before-champion``: before the ``champion`` alias moves.
"""

import os
import sys
import time
from pathlib import Path

POINT = os.environ.get("NEU_PAUSE_AT", "")
SECONDS = 600.0


def pause(name: str) -> None:
    if name == POINT:
        print(f"NEU_PAUSE_AT reached: {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(SECONDS)


def _install_rename() -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        name = Path(os.fsdecode(dst)).name
        pause(f"rename:{name}")
        real(src, dst, *args, **kwargs)
        pause(f"renamed:{name}")

    os.replace = replace


def _install_swap() -> None:
    from neu_model.core import files

    real = files._exchange

    def exchange(new, target):
        pause(f"swap:{Path(target).name}")
        done = real(new, target)
        if done:
            pause(f"swapped:{Path(target).name}")
        return done

    files._exchange = exchange


def _install_register() -> None:
    from mlflow import MlflowClient

    create, set_alias = MlflowClient.create_model_version, MlflowClient.set_registered_model_alias

    def create_model_version(self, *args, **kwargs):
        version = create(self, *args, **kwargs)
        pause("register:version-created")
        return version

    def set_registered_model_alias(self, name, alias, version):
        if alias == "champion":
            pause("register:before-champion")
        return set_alias(self, name, alias, version)

    MlflowClient.create_model_version = create_model_version
    MlflowClient.set_registered_model_alias = set_registered_model_alias


if POINT.startswith(("rename:", "renamed:")):
    _install_rename()
elif POINT.startswith(("swap:", "swapped:")):
    _install_swap()
elif POINT.startswith("register:"):
    _install_register()
