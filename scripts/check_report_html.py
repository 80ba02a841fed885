"""Open a capsafe report.html in headless Chromium and check that it renders: every plot decoded by the browser
at a real size, and a screenshot of the page that is not blank.

    .venv/bin/python scripts/check_report_html.py results/<experiment>/report.html [--screenshot out.png]

Needs Chromium (Debian: apt-get install chromium); exits 1 with the reason if a plot did not render.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000", "--run-all-compositor-stages-before-draw"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return str(shutil.which(name))
    sys.exit("check_report_html: no Chromium found; install it (Debian: apt-get install chromium)")


def check(page: Path, screenshot: Path) -> list[str]:
    """Problems found (empty when the page rendered every plot)."""
    import matplotlib.image as mpimg

    problems = []
    with tempfile.TemporaryDirectory() as profile:
        run = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*run, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        subprocess.run([*run, f"--screenshot={screenshot.resolve()}", "--window-size=1200,2400",
                        page.resolve().as_uri()], capture_output=True, timeout=120)
    images = re.findall(r"<img[^>]*>", dom)
    if not images:
        problems.append("the page has no plots")
    for tag in images:
        size = re.search(r'data-rendered="(\d+)x(\d+)"', tag)
        name = re.search(r'alt="([^"]*)"', tag)
        label = name.group(1) if name else "?"
        if not size:
            problems.append(f"plot {label}: the browser never finished loading the page")
        elif int(size.group(1)) < 100 or int(size.group(2)) < 100:
            problems.append(f"plot {label}: rendered at {size.group(1)}x{size.group(2)}")
    if not screenshot.is_file():
        problems.append("no screenshot was taken")
    elif mpimg.imread(str(screenshot)).std() < 0.02:
        problems.append(f"the screenshot {screenshot} is blank")
    if not problems:
        sizes = ", ".join(re.findall(r'data-rendered="([^"]+)"', dom))
        print(f"{page}: {len(images)} plot(s) rendered ({sizes}); screenshot {screenshot}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path, default=Path(tempfile.gettempdir()) / "capsafe-report.png")
    args = parser.parse_args()
    problems = check(args.page, args.screenshot)
    for p in problems:
        print(f"check_report_html: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
