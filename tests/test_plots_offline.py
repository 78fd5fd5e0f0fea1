"""`dvc plots show|diff` pages draw every interactive plot with the network off (docs/plots.md).

DVC's default page loads vega from a CDN, so on a plant's network it stays blank; .dvc/config
points DVC at plots/offline.html, which inlines the vendored scripts. The browser tests run
headless Chromium in a network namespace of its own where the kernel allows one, and always
with a dead proxy and every host name unresolvable, so no script can come from elsewhere.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neu_model.core.paths import ROOT

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
# DVC's page calls vegaEmbed('#<id>', spec) once per vega plot; vega-embed then draws the plot
# into a <canvas class="marks"> (or <svg class="marks"> with the svg renderer) inside that div.
EMBED_CALL = re.compile(r"vegaEmbed\('#([^']+)'")
DRAWN_MARKS = re.compile(r'<(?:canvas|svg)\b[^>]*\bclass="marks"')


def interactive_plot_count() -> int:
    """How many vega plots dvc.yaml defines: every plot, top-level or a stage's, that is not an image."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    entries = list(pipeline.get("plots", []))
    for stage in pipeline["stages"].values():
        entries += stage.get("plots", [])
    names = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    return sum(not name.lower().endswith(IMAGE_SUFFIXES) for name in names)


def dvc_plots_page(out: Path, *args: str) -> str:
    """Run ``dvc plots <args> -o out`` in the repository and return the page it wrote."""
    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([str(dvc), "plots", *args, "-o", str(out)], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return (out / "index.html").read_text(encoding="utf-8")


@functools.cache
def network_namespace_works() -> bool:
    """Whether ``unshare -n`` may start a process without any network (root or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], check=False, capture_output=True).returncode == 0


def offline_dom(page: Path, profile: Path) -> str:
    """The DOM of ``page`` after headless Chromium ran its scripts with no network."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=10000", "--dump-dom", page.as_uri(),
    ]
    if network_namespace_works():
        command = ["unshare", "-n", *command]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def drawn_plots(dom: str, plot_ids: list[str]) -> list[str]:
    """The plots among ``plot_ids`` whose element in ``dom`` holds drawn marks.

    The plot divs are siblings, so a plot's marks lie between its id and the next plot's.
    """
    starts = sorted((dom.find(f'id="{plot_id}"'), plot_id) for plot_id in plot_ids)
    drawn = []
    for (start, plot_id), (end, _) in zip(starts, [*starts[1:], (len(dom), "")], strict=False):
        if start >= 0 and DRAWN_MARKS.search(dom, start, end):
            drawn.append(plot_id)
    return drawn


def assert_self_contained(html: str) -> None:
    assert re.search(r"<script[^>]*\bsrc=", html) is None, "the page loads a script from elsewhere"
    assert "cdn." not in html and "jsdelivr" not in html


def test_committed_template_is_built_from_the_vendored_scripts():
    result = subprocess.run([sys.executable, str(ROOT / "plots" / "build_template.py"), "--check"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_dvc_plots_show_page_loads_nothing_from_the_network(tmp_path):
    html = dvc_plots_page(tmp_path / "plots", "show")

    assert_self_contained(html)
    assert len(EMBED_CALL.findall(html)) == interactive_plot_count()


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_every_interactive_plot_is_drawn_offline(tmp_path, command):
    html = dvc_plots_page(tmp_path / "plots", *command)
    plot_ids = EMBED_CALL.findall(html)
    assert len(plot_ids) == interactive_plot_count()
    assert_self_contained(html)

    dom = offline_dom(tmp_path / "plots" / "index.html", tmp_path / "chromium")

    assert sorted(drawn_plots(dom, plot_ids)) == sorted(plot_ids)


@pytest.mark.slow
@needs_chromium
def test_dvc_default_cdn_page_stays_blank_offline(tmp_path):
    """The failure the offline template fixes, and proof that the check above can fail."""
    from dvc_render.html import PAGE_HTML

    default_template = tmp_path / "default.html"
    default_template.write_text(PAGE_HTML, encoding="utf-8")
    html = dvc_plots_page(tmp_path / "plots", "show", "--html-template", str(default_template))
    assert "cdn.jsdelivr.net" in html

    dom = offline_dom(tmp_path / "plots" / "index.html", tmp_path / "chromium")

    assert drawn_plots(dom, EMBED_CALL.findall(html)) == []
