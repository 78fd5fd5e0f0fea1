"""The review page in a real browser (headless Chromium driven by Selenium, no network): keys label
tiles, the counter follows, the audit log holds every decision and undo; a server killed with
SIGKILL mid-review loses nothing and resumes at the next unlabelled tile; ``neu-review commit``
then versions the labels in a git + DVC workspace. Prints the median ms from a key press to the
next tile on screen (``pytest -s``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.ops.orchestrate import stop_group
from neu_model.review.queue import load_queue

from review_support import copy_images, row, write_predictions
from server_support import wait_until_answers

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}
SHARE, SEED = 0.1, 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install -y chromium "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    monkeypatch.setenv("SE_AVOID_STATS", "true")
    monkeypatch.setenv("SE_OFFLINE", "true")

    def no_downloads(*_args, **_kwargs):
        raise AssertionError("Selenium Manager was asked for a browser or driver: it would download one")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def start_server(work: Path, state: Path, port: int, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        proc = subprocess.Popen([str(BIN / "neu-review"), "serve", "pred.csv", "--port", str(port), "--state",
                                 str(state), "--random-share", str(SHARE), "--seed", str(SEED)], cwd=work,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_answers(f"http://127.0.0.1:{port}/", proc, log, 120)
    return proc


def records(state: Path) -> list[dict]:
    path = state / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_keys_label_tiles_a_killed_server_loses_nothing_and_commit_versions_them(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    work, state = tmp_path / "work", tmp_path / "state"
    images = copy_images(work / "img")
    rows = [row(f"img/{p.name}", p.name[:2], round(0.30 + 0.02 * i, 2) if i < 12 else 0.95,
                boxes=[[10, 20, 90, 120, 0.7]]) for i, p in enumerate(images)]
    write_predictions(work / "pred.csv", rows, model="models:/neu-defect-classifier/4")
    tiles = load_queue([work / "pred.csv"], SHARE, SEED).tiles
    port, log = free_port(), tmp_path / "serve.log"
    server = start_server(work, state, port, log)
    wait = WebDriverWait(browser, 20)
    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
    timings = lambda: browser.execute_script("return window.reviewTimings.slice()")  # noqa: E731
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        name = wait.until(lambda d: d.find_element(By.ID, "name") if d.find_element(By.ID, "name").is_displayed()
                          else None)
        name.send_keys("alice", Keys.ENTER)
        wait.until(lambda _: text("file") == tiles[0].origin.ref)
        assert text("counter") == f"reviewed 0 / left {len(tiles)}"
        assert text("model") == "models:/neu-defect-classifier/4" and "Cr crazing" in text("top1")
        shown = browser.execute_script("const i = document.querySelector('#tileslot img'); return [i.naturalWidth, "
                                       "i.clientWidth, getComputedStyle(i).imageRendering]")
        assert shown == [200, 600, "pixelated"]  # the 200x200 PNG at 3x, each pixel a 3x3 block
        ActionChains(browser).send_keys("o").perform()  # the boxes overlay, on and off
        assert browser.find_element(By.ID, "overlay").is_displayed()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay rect")) == 1
        ActionChains(browser).send_keys("o").perform()
        assert not browser.find_element(By.ID, "overlay").is_displayed()

        def press(key: str, shows: int) -> None:
            """Press ``key``; wait until tile ``shows`` is on screen and its timing taken."""
            before = len(timings())
            ActionChains(browser).send_keys(key).perform()
            wait.until(lambda _: len(timings()) > before and text("file") == tiles[shows].origin.ref)

        for key, shows in (("1", 1), ("2", 2), ("u", 3), ("3", 4), ("s", 5), ("4", 6), ("z", 5), ("5", 6),
                           (Keys.ARROW_LEFT, 5), (Keys.ARROW_RIGHT, 6), ("6", 7)):
            press(key, shows)
        wait.until(lambda _: len(records(state)) == 9)
        wait.until(lambda _: text("counter") == f"reviewed 6 / left {len(tiles) - 6}")
        done = records(state)
        assert [r["kind"] for r in done] == ["label"] * 4 + ["skip", "label", "undo", "label", "label"]
        assert [r["label"] for r in done] == ["Cr", "In", "unknown", "Pa", None, "PS", "PS", "RS", "Sc"]
        assert [r["tile"] for r in done] == [tiles[i].key for i in (0, 1, 2, 3, 4, 5, 5, 5, 6)]
        assert done[6]["undoes"] == done[5]["id"] and all(r["reviewer"] == "alice" for r in done)
        assert done[0]["seconds"] > 0 and done[0]["model_version"] == "models:/neu-defect-classifier/4"

        taken = timings()  # the page's list starts empty again after the reload below
        os.killpg(server.pid, signal.SIGKILL)  # mid-review: alice still has tiles on her page
        server.wait(timeout=30)
        kept = (state / "audit.jsonl").read_bytes()
        with open(state / "audit.jsonl", "ab") as fh:  # what a kill inside a write would leave
            fh.write(b'{"id":10,"kind":"label","tile":"')
        server = start_server(work, state, port, log)
        assert "removed a partial last line" in log.read_text()
        assert (state / "audit.jsonl").read_bytes() == kept  # every complete decision kept
        browser.refresh()  # the name is remembered; the new start's token comes with the page
        wait.until(lambda _: text("file") == tiles[7].origin.ref)  # 4 stays skipped for alice
        assert text("counter") == f"reviewed 6 / left {len(tiles) - 6}"
        press("1", 8)
        wait.until(lambda _: len(records(state)) == 10)
        assert records(state)[-1]["tile"] == tiles[7].key and records(state)[-1]["id"] == 10
    finally:
        stop_group(server)
    taken += timings()
    print(f"\nreview page: median {statistics.median(taken):.1f} ms from a key press to the next tile on screen "
          f"({len(taken)} presses, headless Chromium)")

    ws = tmp_path / "ws"
    ws.mkdir()
    env = os.environ | GIT_ENV
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "start"]):
        subprocess.run(cmd, cwd=ws, env=env, check=True, capture_output=True)
    done = subprocess.run([str(BIN / "neu-review"), "commit", "--no-event", "--state", str(state)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("committed 7 labels (Cr 2, In 1, Pa 1, RS 1, Sc 1, unknown 1) by alice 7")
    assert len(list((ws / "labels").glob("*.png"))) == 7 and (ws / "labels.dvc").is_file()
    show = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=ws, capture_output=True,
                          text=True, check=True).stdout.split("\n")
    assert show[0].startswith("labels: 7 images (alice 7); data version ") and show[2:] == ["labels.dvc", ""]
