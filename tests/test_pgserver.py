"""neu_model.ops.pgserver's refusals: one line naming the cause and the fix, and nothing left behind.

The cluster itself (initdb, start, stop, the MLflow server on it) is exercised by
tests/test_shared_tracking.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.ops import pgserver


def have_server_programs() -> bool:
    try:
        pgserver.bin_dir()
    except StageError:
        return False
    return True


def test_a_bin_folder_without_pg_ctl_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(pgserver.BIN_ENV, str(tmp_path))
    with pytest.raises(StageError, match=f"{pgserver.BIN_ENV}=.* holds no pg_ctl: .*MLFLOW_BACKEND_STORE_URI"):
        pgserver.bin_dir()


def test_a_taken_port_is_refused_and_a_free_one_chosen(tmp_path):
    with socket.socket() as busy:
        busy.bind((pgserver.HOST, 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(StageError, match=f"port {taken} on 127.0.0.1 is taken"):
            pgserver.choose_port(pgserver.Cluster(tmp_path), taken)
        cluster = pgserver.Cluster(tmp_path)
        cluster.port_file.write_text(f"{taken}\n")  # last time's port, taken now: another one
        assert pgserver.choose_port(cluster, None) != taken


def test_a_folder_holding_something_else_is_refused(tmp_path):
    if not have_server_programs():
        pytest.skip("no PostgreSQL server programs")
    (tmp_path / "pg" / "data").mkdir(parents=True)
    (tmp_path / "pg" / "data" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="not empty and holds no PostgreSQL cluster"):
        pgserver.start(tmp_path / "pg")
    assert (tmp_path / "pg" / "data" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another account")
def test_a_folder_the_cluster_account_cannot_enter_is_refused_in_one_line():
    if not have_server_programs():
        pytest.skip("no PostgreSQL server programs")
    private = Path(tempfile.mkdtemp(prefix="neu-pg-private-"))  # 0700, owned by root
    try:
        done = subprocess.run([sys.executable, "-m", "neu_model.ops.pgserver", "start", "--dir", str(private / "pg")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and f"user {pgserver.SYSTEM_USER} cannot reach" in done.stderr
        assert not (private / "pg" / "data").exists()  # no half-made cluster to trip the next start
    finally:
        shutil.rmtree(private)


def test_status_and_stop_of_a_folder_without_a_cluster(tmp_path):
    if not have_server_programs():
        pytest.skip("no PostgreSQL server programs")
    done = subprocess.run([sys.executable, "-m", "neu_model.ops.pgserver", "status", "--dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (3, "stopped\n")
    assert pgserver.stop(tmp_path) is False
