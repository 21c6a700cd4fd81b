"""Open an HTML page in headless Chromium and report what the browser made of it.

`open_in_chromium(page)` loads a copy of the page with a small script added that, once the
page has loaded, writes onto every `<img>` whether it decoded and its natural size; the DOM
Chromium dumps is then read back: {"images": [{"loaded", "width", "height"}, ...],
"counts": {data-count key: cell text}}. Tests call `chromium_or_skip()` first: without a
browser they skip, naming the package to install.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_TIMEOUT_S = 60
VIRTUAL_TIME_BUDGET_MS = 5000
SCREENSHOT_WINDOW = "1200,4000"
CHECKED_MARKER = "browser-checked"

# Runs after every image has loaded or failed (the window's load event waits for them).
_IMAGE_PROBE = f"""
<script>
window.addEventListener("load", () => {{
  for (const img of document.images) {{
    img.setAttribute("data-browser-loaded", String(img.complete && img.naturalWidth > 0));
    img.setAttribute("data-browser-width", String(img.naturalWidth));
    img.setAttribute("data-browser-height", String(img.naturalHeight));
  }}
  const marker = document.createElement("div");
  marker.id = "{CHECKED_MARKER}";
  document.body.appendChild(marker);
}});
</script>
"""


def chromium_binary() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_or_skip() -> str:
    """The Chromium binary, or a pytest skip that says what to install."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no headless browser found (looked for chromium, chromium-browser, google-chrome); "
                    "install the Debian package `chromium` to run the browser checks")
    return binary


def report_counts(report: dict) -> dict[str, str]:
    """Every count of report.json under its data-count key, as the page shows it."""
    counts = {"samples_in_manifest": report["samples_in_manifest"],
              "captions_truncated": report["captions_truncated"],
              "total/written": sum(report["written"].values()),
              "total/kept": sum(report["kept"].values()),
              "total/skipped": sum(report["skipped"].values())}
    for group in ("written", "kept", "skipped", "would_keep"):
        counts.update({f"{group}/{key}": value for key, value in report[group].items()})
    return {key: str(value) for key, value in counts.items()}


def open_in_chromium(html_path: Path, screenshot: Path | None = None) -> dict:
    """What headless Chromium saw of the page at `html_path`: its images (loaded, natural
    width and height, in page order) and its `data-count` cells (key: text). With
    `screenshot`, a PNG of the top of the page (1200 x 4000 px) is also saved there."""
    binary = chromium_or_skip()
    page = Path(html_path).read_text(encoding="utf-8")
    if "</body>" not in page:
        raise ValueError(f"{html_path} has no </body> to add the image probe before")
    with tempfile.TemporaryDirectory(prefix="browser-check-") as folder:
        probed = Path(folder) / "page.html"
        head, _, tail = page.rpartition("</body>")
        probed.write_text(f"{head}{_IMAGE_PROBE}</body>{tail}", encoding="utf-8")
        dom = _run_chromium(binary, Path(folder), ["--dump-dom", probed.as_uri()]).stdout
        if screenshot is not None:
            Path(screenshot).unlink(missing_ok=True)
            _run_chromium(binary, Path(folder), [f"--screenshot={Path(screenshot).resolve()}",
                                                 f"--window-size={SCREENSHOT_WINDOW}",
                                                 Path(html_path).resolve().as_uri()])
            if not Path(screenshot).is_file():
                raise RuntimeError(f"Chromium wrote no screenshot to {screenshot}")
    seen = _DumpedPage()
    seen.feed(dom)
    seen.close()
    if not seen.probe_ran:
        raise RuntimeError(f"the image probe did not run in Chromium; the dumped DOM starts: {dom[:500]!r}")
    return {"images": seen.images, "counts": seen.counts}


def _run_chromium(binary: str, folder: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    profile = folder / "profile"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-2000:]}")
    return result


class _DumpedPage(HTMLParser):
    """Collects the probed images and the text of every element marked `data-count`."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images: list[dict] = []
        self.counts: dict[str, str] = {}
        self.probe_ran = False
        self._open_counts: list[tuple[str, str, int, list[str]]] = []  # tag, key, depth, text

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append({"loaded": attributes.get("data-browser-loaded") == "true",
                                "width": int(attributes.get("data-browser-width") or 0),
                                "height": int(attributes.get("data-browser-height") or 0)})
        if attributes.get("id") == CHECKED_MARKER:
            self.probe_ran = True
        self._open_counts = [(t, k, depth + (t == tag), text) for t, k, depth, text in self._open_counts]
        if "data-count" in attributes:
            self._open_counts.append((tag, attributes["data-count"], 0, []))

    def handle_endtag(self, tag):
        still_open = []
        for open_tag, key, depth, text in self._open_counts:
            if open_tag != tag:
                still_open.append((open_tag, key, depth, text))
            elif depth == 0:
                self.counts[key] = "".join(text).strip()
            else:
                still_open.append((open_tag, key, depth - 1, text))
        self._open_counts = still_open

    def handle_data(self, data):
        for _, _, _, text in self._open_counts:
            text.append(data)
