"""What a person sees: the quickstart in JupyterLab in a real (headless) Chromium, and the report.

(a) A ``jupyter lab`` server on a free localhost port (a token, fresh config/settings dirs, root
dir = a temporary copy of the quickstart) serves the notebook to Chromium driven by Playwright;
Run → Run All Cells runs it. A script injected into the page watches every ipywidgets progress
bar (the live view is replaced by the static report when training ends, so the maximum has to be
recorded while it lives). (b) The HTML report of :func:`render_notebook_report` opens from
``file://``. Screenshots land in ``build/screenshots/``.

Needs Debian's ``/usr/bin/chromium``, Playwright and JupyterLab: when one is missing the tests
fail on CI (``CI`` set) and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the fixtures skip (or fail on CI)
    PlaywrightTimeout = TimeoutError  # type: ignore[assignment,misc]

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
SCREENSHOTS = REPO / "build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SUMMARY = "dbdl: model cancer_model v1 complete | 8 iteration(s)"
EPOCHS = 8

# Records, for the whole life of the page, the largest width (in %) any ipywidgets progress bar
# reached, and the header of the live view. Mutation targets are read directly, so a bar that is
# removed right after its last update still counts; a 100 ms poll backs the observer up.
WATCH_PROGRESS_JS = """
(() => {
  const state = (window.__dbdl = { maxProgress: 0, bars: 0, header: "" });
  const visit = (bar) => {
    const width = parseFloat(bar.style.width);
    if (!Number.isNaN(width)) state.maxProgress = Math.max(state.maxProgress, width);
  };
  const scan = (root) => {
    if (!root.querySelectorAll) return;
    const bars = root.querySelectorAll(".widget-hprogress .progress-bar");
    state.bars = Math.max(state.bars, bars.length);
    bars.forEach(visit);
    for (const el of root.querySelectorAll(".jp-OutputArea .widget-html-content")) {
      if (el.textContent.includes("training ")) state.header = el.textContent;
    }
  };
  new MutationObserver((records) => {
    for (const record of records) {
      const target = record.target;
      if (target.classList && target.classList.contains("progress-bar")) visit(target);
      for (const node of record.addedNodes) {
        if (node.nodeType === 1) scan(node);
      }
    }
  }).observe(document, { subtree: true, childList: true, attributes: true,
                         attributeFilter: ["style"] });
  setInterval(() => scan(document), 100);
})();
"""

# JupyterLab settings for a quiet, deterministic page: the notebook's kernel starts without a
# "Select Kernel" dialog, every cell is attached to the DOM, no news or update checks (this
# machine has no general network access).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def unavailable(what: str) -> None:
    """Fail on CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (required on CI)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / name


def assert_curves_and_metrics_shown(report: Any) -> None:
    """The report's training-curve image has loaded and its metrics table has a row per epoch."""
    image = report.locator('img[src^="data:image/png"]')
    assert image.count() == 1
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    assert report.locator("table.dbdl-metrics tbody tr").count() == EPOCHS


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Playwright context of the system Chromium with a fresh profile directory."""
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@dataclass
class LabServer:
    """A running ``jupyter lab``; ``url(path)`` adds the token."""

    process: subprocess.Popen[bytes]
    port: int
    token: str
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def stop(self) -> None:
        """Shut down the kernels through the API, then the server's process group."""
        with contextlib.suppress(Exception):
            for kernel in self.api("kernels"):
                self.api(f"kernels/{kernel['id']}", method="DELETE")
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabServer]:
    """``jupyter lab`` from this venv, root dir = a fresh copy of the quickstart notebook."""
    if importlib.util.find_spec("jupyterlab") is None:
        unavailable("jupyterlab is not installed")
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(NOTEBOOK, root)
    dirs = {
        name: tmp_path / name for name in ("config", "data", "runtime", "settings", "ipython")
    }
    for path in dirs.values():
        path.mkdir()
    for relative, values in LAB_SETTINGS.items():
        settings = dirs["settings"] / relative
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if k != "DBDL_DATABASE"}
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        IPYTHONDIR=str(dirs["ipython"]),
    )
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI often run as root
    log = tmp_path / "jupyter-lab.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() can always end it all
        )
    server = LabServer(process, port, token, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter lab exited early:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                server.api("status")
                break
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def test_quickstart_in_jupyterlab_shows_live_widget_then_report(browser_context, lab) -> None:
    page = browser_context.new_page()
    page.add_init_script(WATCH_PROGRESS_JS)
    try:
        page.goto(lab.url("lab/tree/quickstart.ipynb"), wait_until="domcontentloaded")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        with contextlib.suppress(PlaywrightTimeout):  # should not appear (autoStartDefaultKernel)
            page.locator(".jp-Dialog .jp-mod-accept").click(timeout=3_000)
        page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(
            timeout=60_000
        )
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

        # Mid-run: the live view (header, progress bar, curves, table) while it trains.
        page.wait_for_function(
            "window.__dbdl.bars > 0 && window.__dbdl.maxProgress >= 25", timeout=90_000
        )
        live = page.locator(".jp-OutputArea-output:has(.widget-hprogress)").first
        with contextlib.suppress(PlaywrightTimeout):  # it may just have become the report
            live.scroll_into_view_if_needed(timeout=2_000)
            page.wait_for_timeout(300)
        page.screenshot(path=str(screenshot_path("quickstart-live.png")))

        # The end: the static report is there and every cell ran (shows "[n]:", not "[*]:").
        page.wait_for_function(
            """() => {
              const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
              return document.querySelector('.jp-OutputArea .dbdl-report') !== null
                && prompts.length > 0 && prompts.every((p) => /\\[\\d+\\]/.test(p.textContent));
            }""",
            timeout=120_000,
        )
        watched = page.evaluate("window.__dbdl")
        assert watched["bars"] >= 1, "the live widget never rendered"
        assert "training cancer_model" in watched["header"], watched
        assert watched["maxProgress"] >= 99.9, f"the progress bar stopped at {watched}"

        report = page.locator(".jp-OutputArea .dbdl-report").first
        report.scroll_into_view_if_needed()
        assert_curves_and_metrics_shown(report)
        assert SUMMARY in report.inner_text() and report.get_by_text(SUMMARY).is_visible()
        assert page.locator(".jp-OutputArea .widget-hprogress").count() == 0  # replaced
        errors = page.locator('.jp-OutputArea-output[data-mime-type*="error"]')
        assert errors.count() == 0, errors.all_inner_texts()
        page.wait_for_timeout(300)
        page.screenshot(path=str(screenshot_path("quickstart-final.png")))
        report.screenshot(path=str(screenshot_path("quickstart-report-output.png")))
    except Exception:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(screenshot_path("quickstart-failure.png")))
            print("page state:", page.evaluate("window.__dbdl"))
        print("jupyter lab log:\n", lab.log.read_text()[-4000:])
        raise
    finally:
        page.close()


def test_html_report_renders_in_the_browser(browser_context, tmp_path: Path) -> None:
    from dbdl_magic.notebook.reports import render_notebook_report

    source = Path(shutil.copy(NOTEBOOK, tmp_path))
    html = render_notebook_report(source, tmp_path / "report" / "quickstart.html", timeout=300)
    assert html.with_suffix(".ipynb").exists()
    page = browser_context.new_page()
    # Report pages reference CDN scripts (require.js, MathJax) they do not need; no network here.
    page.route(
        "**/*",
        lambda route: route.continue_()
        if route.request.url.startswith(("file:", "data:"))
        else route.abort(),
    )
    try:
        page.goto(html.as_uri(), wait_until="load")
        report = page.locator(".dbdl-report").first
        report.wait_for()
        assert_curves_and_metrics_shown(report)
        assert page.get_by_text(SUMMARY).first.is_visible()
        errors = page.locator('.jp-OutputArea-output[data-mime-type*="error"]')
        assert errors.count() == 0, errors.all_inner_texts()
        page.screenshot(path=str(screenshot_path("report-page.png")), full_page=True)
        report.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot_path("report-training.png")))
    finally:
        page.close()
