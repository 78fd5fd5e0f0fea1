"""The plant's whole loop on real images, with a real Prefect server and a real browser.

In WORKSPACE (a git checkout with a champion, e.g. after `make pipeline`):

1. altered copies (darker, less contrast, sensor noise) of ``--images`` test images of the
   public split become a "coil" under ``line/``;
2. ``neu-predict`` scores them with the champion and marks tiles ``needs_review``;
3. ``neu-review serve`` shows them in headless Chromium (Selenium, Debian's chromedriver); a
   scripted reviewer presses the key of each tile's true class (from the file it was made from);
4. ``neu-review commit`` writes labels/, commits labels.dvc and emits ``neu.labels.committed``;
5. the deployment served by ``python -m flows.training serve`` (the ``make serve`` command)
   runs on the event, retrains on the new data version, registers a version and the gate
   decides. Printed: tiles flagged and labelled, the reviewer's key-to-next-tile times, the
   time from the commit to the gate's decision, the decision and its two figures.

    python benchmarks/plant_loop.py WORKSPACE [--images 60] [--random-share 0.5]

Starts ``prefect server start`` on a free 127.0.0.1 port (state in WORKSPACE/.prefect-loop) unless
PREFECT_API_URL is set. Never run it in the checkout you commit from: it commits labels.dvc.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

BIN = Path(sys.executable).parent
KEYS = {"Cr": "1", "In": "2", "Pa": "3", "PS": "4", "RS": "5", "Sc": "6"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    """Whether ``url`` answers 200 (the Prefect API's /health, the review page itself)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def make_coil(ws: Path, n: int, seed: int) -> Path:
    """Altered copies of n test images (n/6 a class), named after the image they come from."""
    split = pd.read_csv(ws / "data" / "split.csv")
    test = split[(split["split"] == "test") & (split.get("origin", "public") == "public")]
    rng = np.random.default_rng(seed)
    picks = test.groupby("label", group_keys=False).apply(lambda g: g.sample(n // 6, random_state=seed))
    coil = ws / "line" / "coil-1"
    coil.mkdir(parents=True, exist_ok=True)
    for file in picks["file"]:
        pixels = np.asarray(Image.open(ws / "data" / "raw" / "NEU-CLS" / file).convert("L"), dtype=np.float32)
        altered = (pixels - pixels.mean()) * 0.6 + pixels.mean() * 0.75 + rng.normal(0, 8, pixels.shape)
        Image.fromarray(np.clip(altered, 0, 255).astype(np.uint8)).save(coil / f"{Path(file).stem}.png")
    return coil


def review_in_browser(url: str, reviewer: str, truth) -> tuple[int, list[float]]:
    """Label every tile the page offers with its true class by key presses; returns (labels, ms)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    labelled = 0
    try:
        driver.get(url)
        name = wait_for(lambda: _shown(driver, "name"), 30, "the reviewer form")
        name.send_keys(reviewer + "\n")
        body = driver.find_element(By.TAG_NAME, "body")
        while True:
            state = wait_for(lambda: _next_state(driver), 60, "a tile or the end of the queue", every=0.05)
            if state == "done":
                break
            file = driver.find_element(By.ID, "file").text
            body.send_keys(KEYS[truth(file)])
            labelled += 1
            wait_for(lambda f=file: driver.find_element(By.ID, "file").text != f or _shown(driver, "done"), 60,
                     "the next tile", every=0.02)
        timings = driver.execute_script("return window.reviewTimings")
    finally:
        driver.quit()
    return labelled, [float(t) for t in timings]


def _shown(driver, element_id: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return found[0] if found and found[0].is_displayed() else None


def _next_state(driver):
    if _shown(driver, "done"):
        return "done"
    return "tile" if _shown(driver, "main") and driver.find_element("id", "file").text else None


def finished_runs(count: int) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])))
    final = sorted((r for r in runs if r.state and r.state.is_final()), key=lambda r: r.start_time)
    return final if len(final) >= count else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--random-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ws = args.workspace.resolve()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"machine: {os.cpu_count()} cores, {cpu}")
    procs = []
    env = os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/mlflow.db")}
    try:
        if not env.get("PREFECT_API_URL"):
            port = free_port()
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            home = ws / ".prefect-loop"
            home.mkdir(exist_ok=True)
            procs.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                           str(port)], cwd=home, env=env | {"PREFECT_HOME": str(home)},
                                          stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        wait_for(lambda: healthy(env["PREFECT_API_URL"] + "/health"), 300, "the Prefect server")
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.training", "serve"], cwd=ws, env=env,
                                      stdout=open(ws / "serve.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        coil = make_coil(ws, args.images, args.seed)
        out = coil.with_suffix(".csv")
        subprocess.run([str(BIN / "neu-predict"), str(coil), "--out", str(out)], cwd=ws, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        frame = pd.read_csv(out)
        frame["truth"] = frame["file"].map(lambda f: Path(f).stem.split("_")[0])
        wrong = frame["predicted"] != frame["truth"]
        print(f"neu-predict on {len(frame)} altered test tiles: {int(frame['needs_review'].sum())} needs_review, "
              f"{int(wrong.sum())} wrong, {int((wrong & ~frame['needs_review']).sum())} wrong and not flagged")
        port = free_port()
        procs.append(subprocess.Popen([str(BIN / "neu-review"), "serve", str(out), "--port", str(port),
                                       "--random-share", str(args.random_share), "--state", str(ws / ".review")],
                                      cwd=ws, env=env, stdout=open(ws / "review.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}/"), 60, "neu-review")
        labelled, timings = review_in_browser(f"http://127.0.0.1:{port}/", "inspector",
                                              lambda f: Path(f).stem.split("_")[0])
        print(f"browser review: {labelled} tiles labelled by key; key press to next tile shown: median "
              f"{statistics.median(timings):.1f} ms, max {max(timings):.1f} ms over {len(timings)} presses")
        done = subprocess.run([str(BIN / "neu-review"), "commit", "--state", str(ws / ".review")], cwd=ws, env=env,
                              capture_output=True, text=True, timeout=600)
        committed = time.monotonic()
        print(done.stdout.strip(), done.stderr.strip()[-500:], sep="\n")
        if done.returncode:
            raise SystemExit("neu-review commit failed")
        run = wait_for(lambda: finished_runs(1), 3 * 3600, "the run the event starts", every=5.0)[0]
        decided = time.monotonic() - committed
        from mlflow import MlflowClient

        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        name = "neu-defect-classifier"
        newest = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        print(f"flow run {run.name}: {run.state.name}; parameters {json.dumps(run.parameters)}")
        print(f"commit -> gate decision: {decided:.0f} s; version {newest.version} "
              f"(labels {newest.tags.get('labels_version')}): {newest.tags.get('gate.decision')}")
        print("gate:", newest.tags.get("gate.reasons"))
        print("champion:", client.get_model_version_by_alias(name, "champion").version)
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    sys.exit(main())
