"""The dashboard in a real browser: Playwright driving Debian's Chromium (no browser download) against
`llama-lora dashboard` started as a user starts it, over runs trained by `llama-lora train`.

Without Chromium or Playwright these tests are skipped with the reason (`make test` prints it); CI sets
LLAMA_LORA_BROWSER_TESTS=required, which turns a skip into a failure. Each page's screenshot is kept under the
test's temporary directory, and also in $LLAMA_LORA_SCREENSHOTS when set (docs/img/ holds one of each).
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
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_in_process, tiny_overrides

CHROMIUM = (
    os.environ.get("LLAMA_LORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
REQUIRED = os.environ.get("LLAMA_LORA_BROWSER_TESTS") == "required"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (make install puts it in .venv)"
    if not CHROMIUM:
        return "no Chromium found (apt-get install chromium, or set LLAMA_LORA_CHROMIUM=PATH)"
    return None


@pytest.fixture(scope="module")
def browser():
    why = _missing()
    if why:
        if REQUIRED:
            pytest.fail(f"browser tests are required here (LLAMA_LORA_BROWSER_TESTS=required) but {why}")
        pytest.skip(f"browser tests skipped: {why}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _train(model_dir: Path, rows: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    return run_in_process("train", *tiny_overrides(model_dir, rows, out, **extra))


def _start_training(model_dir: Path, rows: Path, out: Path, **extra) -> subprocess.Popen:
    args = tiny_overrides(model_dir, rows, out, **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "train", *args, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """A runs directory with two finished runs (a: DoRA, b: LoRA at another learning rate) and a failed one."""
    root = tmp_path_factory.mktemp("runs")
    rows = root.parent / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"instruction": f"Say the number {i} in words.", "output": f"The number is {i}."})
            + "\n"
            for i in range(40)
        )
    )
    steps = {"train.max_steps": 12, "train.eval_steps": 4}
    assert _train(tiny_model_dir, rows, root / "a", **steps).returncode == 0
    b = _train(
        tiny_model_dir, rows, root / "b", **steps, **{"peft.use_dora": False, "train.learning_rate": 3e-3}
    )
    assert b.returncode == 0
    bad = _train(tiny_model_dir, rows, root / "bad", **{"train.learning_rate": 1e30})
    assert bad.returncode == 2 and "training loss became" in bad.stderr
    return root


@pytest.fixture(scope="module")
def site(root):
    """`llama-lora dashboard ROOT` on a free port: its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "dashboard", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "api/runs", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the dashboard did not start: {proc.stderr.read()}")
            time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def page(browser, site, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    assert not errors, f"the page reported errors: {errors}"


def shot(page, tmp_path: Path, name: str) -> Path:
    """The page's screenshot under the test's directory (and $LLAMA_LORA_SCREENSHOTS when set)."""
    path = tmp_path / "screenshots" / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("LLAMA_LORA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / f"dashboard-{name}.png")
    assert path.stat().st_size > 10_000  # a page, not a blank
    return path


def points(page) -> int:
    return int(page.get_attribute("#chart-loss figure", "data-points") or 0)


def test_runs_table_lists_a_finished_and_a_failed_run_with_its_message(page, site, tmp_path):
    page.goto(site + "#/")
    page.wait_for_selector('tr[data-run="bad"]')
    assert page.get_attribute('tr[data-run="a"]', "data-state") == "finished"
    assert page.get_attribute('tr[data-run="bad"]', "data-state") == "failed"
    failed = page.inner_text('tr[data-run="bad"]')
    assert "failed" in failed and "training loss became" in failed
    page.fill("#run-filter", "bad")
    page.wait_for_function("document.querySelectorAll('#runs-table tbody tr').length === 1")
    page.fill("#run-filter", "")
    shot(page, tmp_path, "runs")


def test_a_run_started_while_the_page_is_open_grows_survives_a_reload_and_finishes(
    page, site, root, tiny_model_dir, tmp_path
):
    page.goto(site + "#/")
    page.wait_for_selector('tr[data-run="a"]')
    rows = root.parent / "rows.jsonl"
    proc = _start_training(
        tiny_model_dir, rows, root / "live", **{"train.max_steps": 300, "train.eval_steps": 100}
    )
    try:
        page.click('tr[data-run="live"] a', timeout=90_000)  # appears in the table while the page is open
        page.wait_for_function(
            "Number(document.querySelector('#chart-loss figure')?.dataset.points || 0) > 0", timeout=90_000
        )
        first = points(page)
        assert "running" in page.inner_text(".run-header .state")
        page.wait_for_function(
            f"Number(document.querySelector('#chart-loss figure').dataset.points) > {first}", timeout=60_000
        )
        grown = points(page)
        page.reload()
        assert page.url.endswith("#/run/live")
        page.wait_for_function(
            f"Number(document.querySelector('#chart-loss figure')?.dataset.points || 0) >= {grown}",
            timeout=30_000,
        )
        shot(page, tmp_path, "run")
        page.wait_for_function(
            "document.querySelector('.run-header .state')?.textContent === 'finished'", timeout=240_000
        )
        assert proc.wait(timeout=60) == 0
        assert points(page) > grown
    finally:
        proc.kill()


def test_a_run_killed_with_sigkill_shows_as_died_within_a_minute(page, site, root, tiny_model_dir, tmp_path):
    rows = root.parent / "rows.jsonl"
    proc = _start_training(tiny_model_dir, rows, root / "doomed", **{"train.max_steps": 100_000})
    try:
        deadline = time.time() + 90
        while not (root / "doomed" / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.5)
        page.goto(site + "#/run/doomed")
        page.wait_for_function("document.querySelector('.run-header .state')?.textContent === 'running'")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    page.wait_for_function(
        "document.querySelector('.run-header .state')?.textContent === 'died'", timeout=60_000
    )
    assert time.monotonic() - killed < 60
    assert "process is gone" in page.inner_text(".run-header")
    page.goto(site + "#/")
    page.wait_for_selector('tr[data-run="doomed"][data-state="died"]')


def test_the_data_tab_marks_the_trained_spans(page, site, tmp_path):
    page.goto(site + "#/run/a/data")
    page.wait_for_selector("article.example mark.trained", timeout=60_000)
    trained = page.locator("article.example mark.trained").first.inner_text()
    assert trained.startswith("The number is") and "Say the number" not in trained
    context = page.locator("article.example pre").first.inner_text()
    assert "Say the number" in context  # the prompt is shown, unmarked
    shot(page, tmp_path, "data")


def test_comparing_two_selected_runs_marks_their_config_difference(page, site, tmp_path):
    page.goto(site + "#/")
    page.check('input[aria-label="select a"]')
    page.check('input[aria-label="select b"]')
    page.click("#compare-selected")
    page.wait_for_selector("#config-diff tr.differs")
    differing = page.locator("#config-diff tr.differs th").all_inner_texts()
    assert any(t.startswith("train.learning_rate") for t in differing)
    assert any(t.startswith("peft.use_dora") for t in differing)
    page.wait_for_selector("#chart-loss figure")
    series = page.locator("#chart-loss path.series").evaluate_all("ps => ps.map(p => p.dataset.series)")
    assert {"a train", "b train", "a eval", "b eval"} <= set(series)
    shot(page, tmp_path, "compare")


def test_chat_streams_the_base_and_two_adapters_side_by_side(page, site, tiny_model_dir, tmp_path):
    page.goto(site + "#/chat/a,b")
    page.wait_for_selector('input[value="a"]:checked')
    page.fill("#chat-prompt", "Say the number 7 in words.")
    page.fill("#chat-max-tokens", "24")
    # count the pieces each answer receives: streamed means many appends, not one whole answer
    page.evaluate(
        """() => { window.pieces = {}; new MutationObserver((changes) => { for (const c of changes) {
             const col = c.target.dataset && c.target.dataset.column;
             if (col && c.addedNodes.length) window.pieces[col] = (window.pieces[col] || 0) + 1; } })
           .observe(document.getElementById('view'), {childList: true, subtree: true}); }"""
    )
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('.answer[data-done]').length === 3", timeout=180_000)
    columns = page.locator(".column h2").all_inner_texts()
    assert columns == [f"{tiny_model_dir.name} (base)", "a", "b"]
    pieces = page.evaluate("window.pieces")
    assert set(pieces) == {"a", "b", str(tiny_model_dir)} and min(pieces.values()) > 1
    footers = page.locator(".column p.muted").all_inner_texts()
    assert all("tokens" in f for f in footers)
    shot(page, tmp_path, "chat")
