"""Render an HTML report (e.g. ``kdcli analyze --out DIR``'s ``report.html``) to a PNG with
headless Chromium, to look at it without a browser::

    .venv/bin/python benchmarks/render_report.py runs/analysis/report.html [--out report.png]
        [--size 1400,4000] [--chromium chromium]

Network features of Chromium are switched off, so the page must be self-contained (kdcli's
reports are). Prints JSON (``{"png": ..., "bytes": ...}``); exits 2 with a one-line message
when Chromium or the HTML file is missing or the screenshot fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def find_chromium(name: str | None = None) -> str | None:
    """The Chromium executable: ``name`` if given, else the first of the usual names on PATH."""
    for cand in ([name] if name else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        path = shutil.which(cand)
        if path:
            return path
    return None


def render(html_path: Path, png_path: Path, *, size: tuple[int, int] = (1400, 4000), chromium: str | None = None,
           timeout: float = 120.0) -> Path:
    """Screenshot ``html_path`` into ``png_path`` at a ``size`` (width, height) window; returns the PNG path."""
    exe = find_chromium(chromium)
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH (apt-get install -y chromium)")
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such HTML file")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-report-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png_path}",
               f"--window-size={size[0]},{size[1]}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png_path.is_file():
        tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise RuntimeError(f"chromium exited with {proc.returncode}: {tail}")
    return png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render an HTML report to PNG with headless Chromium.")
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, help="PNG path (default: the HTML path with .png)")
    ap.add_argument("--size", default="1400,4000", help="window WIDTH,HEIGHT in pixels")
    ap.add_argument("--chromium", help="Chromium executable (default: found on PATH)")
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.split(","))
        png = render(args.html, args.out or args.html.with_suffix(".png"), size=(w, h), chromium=args.chromium)
    except ValueError:
        print(f"error: --size: expected WIDTH,HEIGHT, got {args.size!r}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"png": str(png), "bytes": png.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
