"""CI: `llama-lora dashboard` watching `make demo` in a real browser, as a user with two terminals would.

Started before `make demo`; it serves runs/ on a free port, opens the runs table in Chromium (Playwright),
waits for the demo run to appear as running, opens it, and samples the loss chart's point count until the
run's state turns to finished. It fails (exit 1) unless the curve grew while the run was running and the
state turned to finished. Usage: watch_demo.py RUNS_DIR [TIMEOUT_S]
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> int:
    runs = Path(sys.argv[1])
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 1200
    runs.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "dashboard", str(runs), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "api/runs", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        return watch(url, timeout)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def watch(url: str, timeout: float) -> int:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("LLAMA_LORA_CHROMIUM") or shutil.which("chromium")
    start = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "#/")
        page.click('tr[data-run="demo"][data-state="running"] a', timeout=timeout * 1000)
        appeared = time.monotonic() - start
        samples: list[int] = []
        state = "running"
        while state == "running" and time.monotonic() - start < timeout:
            time.sleep(5)
            state = page.inner_text(".run-header .state")
            samples.append(int(page.get_attribute("#chart-loss figure", "data-points") or 0))
        browser.close()
    grew = sum(b > a for a, b in zip(samples, samples[1:]))
    print(
        f"dashboard: the demo appeared as running after {appeared:.0f} s; its loss curve grew {grew} times "
        f"over {len(samples)} samples ({samples[0] if samples else 0} -> {samples[-1] if samples else 0} points); "
        f"state {state} after {time.monotonic() - start:.0f} s",
        flush=True,
    )
    return 0 if state == "finished" and grew >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
