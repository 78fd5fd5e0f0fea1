"""One run at a time per workspace, tested with real processes: a live holder turns the next
run away, a killed one leaves nothing that blocks, --wait waits, DVC's stale rwlock goes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neu_model.core.paths import LOCK_FILE, ROOT
from neu_model.ops.dvc_rwlock import clear_stale_dvc_rwlock
from neu_model.ops.workspace_lock import EXIT_BUSY, WorkspaceBusy, status, workspace_lock

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# A holder that takes the lock in its own process and keeps it until its stdin closes.
HOLDER = ("import sys\nfrom neu_model.ops.workspace_lock import workspace_lock\n"
          "with workspace_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def lock_cli(root: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neu_model.ops.workspace_lock", "run", "--root", str(root), *args],
                            env=ENV, text=True, **popen)


def holder_process(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def record(root: Path, key: str, timeout: float = 60) -> dict:
    """The lock file's record once it has ``key`` (the holder writes it after starting up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (root / LOCK_FILE).read_text() if (root / LOCK_FILE).exists() else ""
        if text and json.loads(text).get(key):
            return json.loads(text)
        time.sleep(0.05)
    raise AssertionError(f"no {key} in {root / LOCK_FILE}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_run_is_refused_naming_the_holder_and_signals_reach_the_command(root, sig):
    holder = lock_cli(root, "--", "sleep", "60")
    child = record(root, "child")["child"]
    second = subprocess.run([sys.executable, "-m", "neu_model.ops.workspace_lock", "run", "--root", str(root), "--",
                             "true"], env=ENV, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == EXIT_BUSY
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by pid {holder.pid} (started " in lines[0] and ": sleep 60)" in lines[0]
    with pytest.raises(WorkspaceBusy, match=rf"pid {holder.pid} \(started .*: sleep 60\)"):
        with workspace_lock(root):
            pass
    holder.send_signal(sig)
    assert holder.wait(timeout=60) == 128 + sig  # forwarded: sleep died of it, run exits as the shell would
    assert not alive(child)
    notes = []
    with workspace_lock(root, note=notes.append):
        assert notes == []  # released cleanly: nothing to take over


def test_run_exits_with_the_command_code_and_clears_its_record(root):
    proc = lock_cli(root, "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert proc.wait(timeout=60) == 3
    assert (root / LOCK_FILE).read_text() == ""


def test_lock_of_a_killed_holder_is_taken_over_with_a_note(root):
    holder = holder_process(root)
    holder.kill()  # SIGKILL: no cleanup ran, the kernel released the flock
    holder.wait(timeout=60)
    notes = []
    with workspace_lock(root, note=notes.append) as held:
        assert held.holder.pid == os.getpid()
    assert len(notes) == 1 and f"took over the lock of pid {holder.pid}" in notes[0]
    assert "ended without releasing it" in notes[0]


def test_command_keeps_the_lock_when_run_itself_is_killed(root):
    wrapper = lock_cli(root, "--", "sleep", "60")
    child = record(root, "child")["child"]
    wrapper.kill()
    wrapper.wait(timeout=60)
    with pytest.raises(WorkspaceBusy, match=rf"pid {wrapper.pid} .*which is gone, but its command still runs as "
                                            rf"pid {child}"):
        with workspace_lock(root):
            pass
    os.kill(child, signal.SIGKILL)
    notes = []
    with workspace_lock(root, wait=60, note=notes.append):
        assert any(f"took over the lock of pid {wrapper.pid}" in n for n in notes)


def test_wait_waits_until_the_holder_releases(root, tmp_path):
    holder = holder_process(root)
    done = tmp_path / "ran"
    waiter = lock_cli(root, "--wait", "--", sys.executable, "-c", f"open({str(done)!r}, 'w')",
                      stderr=subprocess.PIPE)
    assert f"waiting for pid {holder.pid}" in waiter.stderr.readline()
    assert waiter.poll() is None and not done.exists()  # still waiting, command not started
    holder.stdin.close()  # the holder leaves its with block and exits
    assert holder.wait(timeout=60) == 0
    assert waiter.wait(timeout=60) == 0 and done.exists()


def test_wait_with_a_limit_gives_up_naming_the_holder(root):
    holder = holder_process(root)
    with pytest.raises(WorkspaceBusy, match=rf"pid {holder.pid} .*gave up after 0.3s") as err:
        with workspace_lock(root, wait=0.3, note=lambda _: None):
            pass
    assert "\n" not in str(err.value)  # the holder's command line has newlines: escaped
    holder.stdin.close()
    holder.wait(timeout=60)


def test_status_names_the_holder_without_taking_the_lock(root):
    assert status(root).endswith("neu-workspace.lock: free")
    holder = holder_process(root)
    assert f"held by pid {holder.pid} (started " in status(root)
    holder.kill()
    holder.wait(timeout=60)
    assert f"free (its last holder, pid {holder.pid} " in status(root)


def test_command_under_run_takes_the_lock_again_without_blocking(root):
    nested = ("import sys\nfrom neu_model.ops.workspace_lock import workspace_lock\n"
              "with workspace_lock(sys.argv[1]) as held:\n    print('nested', held.holder.child)\n")
    proc = lock_cli(root, "--", sys.executable, "-c", nested, str(root), stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split()[0] == "nested" and int(out.split()[1]) > 0


# ---------------------------------------------------------------- DVC's rwlock

def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_rwlock(root: Path, *pids: int) -> Path:
    """A rwlock as `dvc repro` writes it: the first pid writes out/, every pid reads in.txt."""
    info = [{"pid": pid, "cmd": "dvc repro"} for pid in pids]
    path = root / ".dvc" / "tmp" / "rwlock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"read": {str(root / "in.txt"): info}, "write": {str(root / "out"): info[0]}}))
    return path


def test_stale_dvc_rwlock_of_a_dead_process_is_removed(root):
    pid = dead_pid()
    rwlock = write_rwlock(root, pid)
    notes = []
    with workspace_lock(root, note=notes.append):
        assert not rwlock.exists()
    assert notes == [f"removed stale DVC lock of dead process {pid} (dvc repro): {rwlock}"]


def test_dvc_rwlock_of_a_live_process_is_kept(root):
    live = subprocess.Popen(["sleep", "60"])
    try:
        rwlock = write_rwlock(root, dead_pid(), live.pid)
        before = rwlock.read_text()
        notes = []
        with workspace_lock(root, note=notes.append):
            assert rwlock.read_text() == before
        assert notes == []
        # The same live pid in a lock written before it started: the pid was reused, the lock is stale.
        os.utime(rwlock, (time.time() - 3600, time.time() - 3600))
        assert clear_stale_dvc_rwlock(rwlock.parent, notes.append) and not rwlock.exists()
    finally:
        live.kill()
        live.wait()


def test_unreadable_dvc_rwlock_is_removed_unless_dvc_is_editing_it(root):
    import fcntl

    rwlock = write_rwlock(root, dead_pid())
    rwlock.write_text(rwlock.read_text()[:20])  # dvc killed mid-write
    guard = os.open(rwlock.parent / "rwlock.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # as a dvc process editing the file holds it
        assert clear_stale_dvc_rwlock(rwlock.parent, print) is False and rwlock.exists()
    finally:
        os.close(guard)
    notes = []
    assert clear_stale_dvc_rwlock(rwlock.parent, notes.append) and not rwlock.exists()
    assert "removed unreadable DVC lock" in notes[0]


@pytest.mark.slow
def test_rwlock_left_by_a_killed_dvc_repro_is_cleared(root):
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "-q", "-f"], cwd=root, check=True, env=ENV)
    (root / "dvc.yaml").write_text("stages:\n  slow:\n    cmd: sleep 60 && echo done > out.txt\n"
                                   "    deps: [in.txt]\n    outs: [out.txt]\n")
    (root / "in.txt").write_text("a\n")
    repro = subprocess.Popen([dvc, "repro"], cwd=root, env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    deadline = time.monotonic() + 120
    while not (rwlock.exists() and '"write"' in rwlock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(repro.pid, signal.SIGKILL)  # dvc and its stage, with no chance to clean up
    repro.wait()
    assert str(repro.pid) in rwlock.read_text()
    notes = []
    with workspace_lock(root, note=notes.append):
        pass
    assert len(notes) == 1 and notes[0].startswith(f"removed stale DVC lock of dead process {repro.pid} (")
    assert notes[0].endswith(f"dvc repro): {rwlock}") and not rwlock.exists()
