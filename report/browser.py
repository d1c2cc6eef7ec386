"""Open a report page in headless Chromium: check that every image loads and nothing logs an
error, and take a screenshot. For the tests and for looking at a page as a person would.

Chromium is Debian's ``chromium`` package (``apt-get install chromium``); it is found on the
PATH or through ``$CHROMIUM``.

Public API:
    find_chromium, PageCheck, check_page, screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: Flags for a quiet, offline, sandbox-free start (the tests run as root with no network).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
TIMEOUT_S = 60

#: Inserted first into a copy of the page: records every failed resource and script error
#: (capture phase: an <img> error does not bubble), then writes a JSON summary into the DOM.
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__errors.push(t.src ? 'failed to load ' + t.src : String(e.message));
}, true);
console.error = function () { window.__errors.push(Array.from(arguments).join(' ')); };
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: broken.map(function (i) { return i.getAttribute('src'); }),
    errors: window.__errors,
    sections: Array.from(document.querySelectorAll('section')).map(function (s) { return s.id; })
  });
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium`` or ``chromium-browser`` on
    the PATH; ``None`` when there is none."""
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser"]
    for name in filter(None, candidates):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    """What loading a page showed.

    Args:
        images: ``<img>`` elements on the page.
        broken: the ``src`` of each that did not load.
        errors: errors the page raised or logged (failed resources included).
        sections: the ``id`` of every ``<section>``, in order.
    """

    images: int
    broken: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)


def _run(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )


def check_page(index: str | Path, chromium: str) -> PageCheck:
    """Load ``index`` (an HTML file) and report its images and errors.

    The probe goes into a copy beside the page, so relative links resolve as they do for the
    page itself; the copy is removed afterwards.

    Raises:
        RuntimeError: Chromium gave no result (its last stderr line is in the message).
    """
    index = Path(index).resolve()
    text = index.read_text(encoding="utf-8")
    probed = re.sub(r"<head>", "<head>" + _PROBE, text, count=1)
    probe = index.with_name(f".probe-{index.name}")
    probe.write_text(probed, encoding="utf-8")
    try:
        proc = _run(chromium, "--virtual-time-budget=20000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, flags=re.S)
    if not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"chromium returned no page for {index}: {last}")
    return PageCheck(**json.loads(html.unescape(found.group(1))))


def screenshot(index: str | Path, out: str | Path, chromium: str, size=(1280, 2400)) -> Path:
    """Save a screenshot of the page's top ``size`` (width, height) pixels to ``out`` (PNG).

    Raises:
        RuntimeError: no screenshot was written.
    """
    out = Path(out).resolve()
    width, height = size
    proc = _run(
        chromium,
        f"--window-size={width},{height}",
        f"--screenshot={out}",
        "--virtual-time-budget=20000",
        Path(index).resolve().as_uri(),
    )
    if not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"chromium wrote no screenshot of {index}: {last}")
    return out
