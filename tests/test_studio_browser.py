"""tunelab studio end to end in a real headless browser: Debian's chromium driven by Playwright.

One session, as a user would go: create the quickstart run from the form (on the tiny model,
so that it trains in seconds), watch the loss chart gain points, stop it and see a resumable
checkpoint, resume it, restart the studio and find the run, compare it with its base and open
the HTML report, chat and see a streamed answer. Screenshots go to
``$TUNELAB_TEST_ARTIFACTS/studio`` (default ``test-artifacts/studio`` in the repository).

Playwright launches ``/usr/bin/chromium`` (never ``playwright install``, which downloads a
browser); ``.ci/run`` installs Debian's package as root. Without it the test skips, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from studio_helpers import REPO, logged_steps, make_workspace, wait_for

from tunelab.studio.jobs import JobRecord, alive_and_ours

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TUNELAB_TEST_ARTIFACTS", REPO / "test-artifacts")) / "studio"
# Flags that keep Chromium off the network it would otherwise try at start (none is reachable here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
STEPS = 60
"""Planned steps of the run: long enough to stop it mid-way, short enough to finish after the resume."""

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install 'tunelab[dev]' brings playwright 1.64)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser: Debian's chromium is not installed at {CHROMIUM} "
                    "(apt-get install chromium, as root; .ci/run does it)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Studio:
    """``tunelab studio`` as a real process; ``restart()`` ends it and starts a new one on the same port."""

    def __init__(self, workspace: Path, log: Path):
        self.workspace, self.log = workspace, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "TUNELAB_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunelab", "studio", "--workspace", str(self.workspace), "--port", str(self.port),
                 "--stop-timeout", "60"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

        def up():
            assert self.proc.poll() is None, self.log.read_text()
            try:
                return httpx.get(self.url + "api/info", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, 60, "the studio to answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def studio(tmp_path, tiny_dir):
    workspace = make_workspace(tmp_path / "ws", tiny_dir)
    server = Studio(workspace, tmp_path / "studio.log")
    yield server
    server.stop()
    for folder in (workspace / "runs").glob("*"):  # never leave a job behind
        record = JobRecord.load(folder)
        if record and alive_and_ours(record):
            os.killpg(record.pgid, signal.SIGKILL)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=False)
    with open(ARTIFACTS / "timings.txt", "a", encoding="utf-8") as out:
        out.write(f"{time.strftime('%H:%M:%S')} {name}\n")


def set_field(page, key: str, value: str) -> None:
    """Type into a form field and leave it (a change event), then wait for the YAML to follow."""
    field = page.locator(f'#run-form [name="{key}"]')
    if field.evaluate("e => e.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)
        field.press("Tab")


def status(page) -> str:
    return page.locator("#run-status").get_attribute("data-status") or ""


@pytest.fixture
def page(browser, studio):
    """A page on the studio; on a failure its screenshot and the studio log are kept as artifacts."""
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    if not page.is_closed():
        shot(page, "last.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(studio.log, ARTIFACTS / "studio.log")
    page.close()


def test_studio_in_a_real_browser(page, studio):
    errors = page.errors
    page.goto(studio.url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)

    # ---- New run: the quickstart recipe, on the tiny model
    page.select_option("#recipe-from", "recipes/quickstart.yaml")
    page.click("#load-recipe")
    page.wait_for_function("document.querySelector('#yaml').value.includes('quickstart')")
    assert page.input_value('#run-form [name="model.name"]') == "builtin:smollm2-135m-instruct"
    set_field(page, "model.name", "models/tiny")
    page.wait_for_function("document.querySelector('#yaml').value.includes('name: models/tiny')")
    set_field(page, "train.lr", "fast")  # a bad value: one error, next to its field
    error = page.locator('.field[data-field="train.lr"] .field-error')
    error.wait_for(state="visible")
    assert error.inner_text() == "train.lr: 'fast' is not a number"
    set_field(page, "train.lr", "2e-3")
    page.wait_for_function("document.querySelector('.field[data-field=\"train.lr\"] .field-error').textContent === ''")
    for key, value in (("train.max_steps", str(STEPS)), ("train.bf16", "false"), ("train.eval_steps", "10"),
                       ("output_dir", "runs/quick")):
        set_field(page, key, value)
    page.wait_for_function("document.querySelector('#yaml').value.includes('output_dir: runs/quick')")
    page.wait_for_function("document.querySelector('#stats').textContent.includes('48 (0 multi-turn)')")
    page.wait_for_function("document.querySelectorAll('#preview span.learn').length >= 2")  # answers highlighted
    page.wait_for_selector("#env-precision", timeout=60_000)
    page.wait_for_function("document.querySelector('#estimate').textContent.includes('GiB')")
    shot(page, "01-new-run.png")
    page.click("#launch")

    # ---- Runs: the loss chart gains points
    page.wait_for_selector('#runs-table tr[data-run="runs/quick"]')
    page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.train) >= 3", timeout=90_000)
    before = int(page.locator("#loss-chart").get_attribute("data-train"))
    page.wait_for_function(f"Number(document.querySelector('#loss-chart').dataset.train) > {before}", timeout=30_000)
    assert status(page) == "running"
    shot(page, "02-runs-live.png")

    # ---- Stop: a checkpoint, resumable
    page.click("#stop")
    page.wait_for_function("document.querySelector('#run-status').dataset.status === 'stopped'", timeout=60_000)
    page.wait_for_function("document.querySelector('#run-checkpoints').textContent.includes('checkpoint-')")
    assert page.locator("#resume").is_enabled() and not page.locator("#stop").is_enabled()
    shot(page, "03-stopped.png")
    run = studio.workspace / "runs" / "quick"
    stopped_at = logged_steps(run)[-1]
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()

    # ---- Resume, then restart the studio while the job runs: the new studio finds it
    page.click("#resume")
    page.wait_for_function("document.querySelector('#run-status').dataset.status === 'running'", timeout=30_000)
    job = JobRecord.load(run)
    studio.restart()
    assert alive_and_ours(job) or (run / "README.md").is_file()  # the job outlived its studio
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click('nav button[data-tab="runs"]')
    row = page.locator('#runs-table tr[data-run="runs/quick"]')
    row.wait_for()
    assert row.get_attribute("data-status") in ("running", "finished")
    page.wait_for_function("document.querySelector('#run-status').dataset.status === 'finished'", timeout=180_000)
    assert logged_steps(run) == list(range(1, STEPS + 1))  # resumed at the checkpoint: no step lost or repeated
    shot(page, "04-finished.png")

    # ---- Compare the run with its base model and open the HTML report
    page.click('nav button[data-tab="compare"]')
    page.fill("#cmp-name", "quick-vs-base")
    page.fill("#cmp-models", "models/tiny\nruns/quick")
    page.fill("#cmp-datasets", "data/test.jsonl")
    page.fill("#cmp-max-new", "12")
    page.click("#cmp-launch")
    page.wait_for_function("document.querySelector('#cmp-status')?.dataset.status === 'finished'", timeout=180_000)
    table = page.locator("table.cmp-table").first
    assert "Δ (last − first)" in table.inner_text() and "em" in table.inner_text()
    assert page.locator("#cmp-detail .sample").count() >= 2  # best and worst rows
    shot(page, "05-compare.png")
    with page.expect_popup() as popup:
        page.click("#cmp-report")
    report = popup.value
    report.wait_for_load_state()
    assert "quick" in report.content() and "tiny" in report.content()
    report.close()

    # ---- Chat with the run, then with the base: streamed answers
    page.click('nav button[data-tab="chat"]')
    page.fill("#chat-model", "runs/quick")
    page.fill("#chat-max-new", "16")
    page.fill("#chat-input", "Term: Eczematid")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=90_000)
    page.fill("#chat-model", "models/tiny")
    page.fill("#chat-input", "Term: Eczematid")
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done=true]').length === 2", timeout=90_000)
    last = page.locator(".msg.assistant").last
    assert int(last.get_attribute("data-chunks")) >= 2 and last.inner_text().strip()
    shot(page, "06-chat.png")
    assert not errors, errors
    (ARTIFACTS / "run-metrics.jsonl").write_text((run / "metrics.jsonl").read_text(encoding="utf-8"))
    assert json.loads((studio.workspace / "compare" / "quick-vs-base" / "report.json").read_text())["models"]
