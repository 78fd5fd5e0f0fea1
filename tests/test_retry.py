"""Which failures the Prefect tasks retry: what may pass, never bad input."""

from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from neu_model.core.config import ConfigError
from neu_model.core.stage import StageError
from neu_model.ops.orchestrate import StageFailed, is_transient
from tasks.retry import retry_if_transient

UNREACHABLE = "error: MLflow store http://127.0.0.1:5000 does not answer (connection refused); start the server"


@pytest.mark.parametrize(("exc", "transient"), [
    (StageFailed("register", 2, ["error: reports/metrics.json: not found; run the evaluate stage first"]), False),
    (StageFailed("register", 2, [UNREACHABLE]), True),
    (StageFailed("register", 1, ["Traceback ...", "sqlite3.OperationalError: database is locked"]), True),
    (StageFailed("register", None, ["killed after 900s"]), True),
    (StageError("models:/neu@champion: cannot load the model (alias not found)"), False),
    (StageError(UNREACHABLE), True),
    (ConfigError("params.yaml: no key 'train.nope'"), False),
    (TimeoutError("read timed out"), True),
])
def test_bad_input_is_not_retried_anything_else_is(exc, transient):
    assert is_transient(exc) is transient
    assert retry_if_transient(None, None, Failed(data=exc)) is transient


def test_a_completed_state_is_no_reason_to_stop():
    assert retry_if_transient(None, None, Completed(data=1)) is True
