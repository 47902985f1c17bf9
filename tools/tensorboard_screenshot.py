"""Serve a run folder with TensorBoard and take headless-browser screenshots of its scalars and images.

    pip install playwright               # the Python package only; the browser is Debian's chromium
    apt-get install -y chromium
    python tools/tensorboard_screenshot.py runs/chain/version_0 docs/

Writes ``tensorboard_scalars.png`` and ``tensorboard_images.png`` into the output folder and prints the checks it
made (the page loaded, the expected tag names are on it). Not part of the test suite (it needs a browser).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--expect", nargs="*", default=["compression", "preservation", "pruning"])
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        flags = [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=flags)
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            found = {}
            for plugin in ("scalars", "images"):
                page.goto(f"{url}/?darkMode=false#{plugin}", wait_until="networkidle")
                time.sleep(4)
                # locators pierce TensorBoard's shadow DOM, page text does not
                found[plugin] = {tag: page.get_by_text(tag).count() > 0 for tag in args.expect}
                page.screenshot(path=str(args.out / f"tensorboard_{plugin}.png"), full_page=False)
            browser.close()
        print(found)
        ok = all(any(v.values()) for v in found.values())
        print("screenshots written to", args.out, "- tags visible" if ok else "- expected tags NOT visible")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(main())
