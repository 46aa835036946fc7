"""The reports as a reader sees them: rendered by headless Chromium, every image loads and no table is wider
than the page.

The report itself holds no script. The test copies it beside itself (same folder, so relative figure paths
still resolve) with a script that, once the page has loaded, writes its measurements into the DOM; Chromium's
``--dump-dom`` prints that DOM. Chromium runs offline (file:// only, no network features) with a fresh profile,
and the test waits for it to exit. Without a ``chromium`` binary the test skips (``.ci/run`` installs it).
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedinspect.evaluation.document import Document, Table
from fedinspect.evaluation.report import write_report

from .test_report import make_curves, make_examples, make_results

WINDOW = (1280, 900)
"""A laptop-sized window: the page's content column is narrower than this."""

_CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const main = document.querySelector("main");
  const style = getComputedStyle(main);
  const box = main.getBoundingClientRect();
  const contentRight = box.right - parseFloat(style.paddingRight);
  const report = {
    viewport: document.documentElement.clientWidth,
    scrollWidth: document.documentElement.scrollWidth,
    contentRight: contentRight,
    images: Array.from(document.images).map(img => ({
      src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth, shown: img.clientWidth})),
    tables: Array.from(document.querySelectorAll("table")).map(table => ({
      first: table.rows[0].cells[0].textContent, right: table.getBoundingClientRect().right,
      width: table.scrollWidth, box: table.parentElement.clientWidth})),
  };
  const out = document.createElement("pre");
  out.id = "browser-checks";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: install the Debian package chromium")


def measure(report_html: Path, profile: Path) -> dict:
    """Load ``report_html`` in headless Chromium and return what the check script measured."""
    page = report_html.with_name("_browser_check.html")
    source = report_html.read_text(encoding="utf-8")
    assert source.count("</body>") == 1
    page.write_text(source.replace("</body>", _CHECK_SCRIPT + "</body>"), encoding="utf-8")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=10000",
        "--dump-dom", page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r'<pre id="browser-checks">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no measurements from Chromium (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html_lib.unescape(match.group(1)))


def assert_reads_well(checks: dict, expected_images: int) -> None:
    assert len(checks["images"]) == expected_images
    for image in checks["images"]:
        assert image["complete"] and image["width"] > 0, f"image did not load: {image['src']}"
        assert 0 < image["shown"] <= checks["contentRight"], image
    assert checks["tables"], "no table rendered"
    for table in checks["tables"]:
        assert table["right"] <= checks["contentRight"] + 0.5, f"table {table['first']!r} overflows the page"
        assert table["width"] <= table["box"] + 0.5, f"table {table['first']!r} needs a scroll bar"
    assert checks["scrollWidth"] <= checks["viewport"], "the page scrolls sideways"


def test_run_report_renders_in_a_browser(tmp_path: Path) -> None:
    results = make_results()
    for client in results["clients"]:  # the widest tables: per-client results and fairness
        client.update(test_counts={"test": 40, "test_good": 20, "test_defective": 20},
                      test_categories={"pipe_clip": 20, "tank_screw": 20}, image_auroc=0.9, auc_spro={"0.05": 0.5},
                      notes={"auc_spro": "no defect region in this client's share of tank_screw"})
    results["fairness"] = {"image_auroc": {"clients": {"worst": 0.9, "worst_of": "Client 2", "best": 0.9,
                                                       "gap": 0.0, "cv": 0.0, "jain": 1.0}}}
    _, report_html = write_report(tmp_path / "run", results, make_curves(), make_examples(), title="Browser check")
    figures = len(re.findall(r"<img ", report_html.read_text(encoding="utf-8")))
    assert figures == 6  # curves (2), bars per category and per client, examples of 2 categories
    assert_reads_well(measure(report_html, tmp_path / "profile"), figures)


def test_wide_table_fits_the_page(tmp_path: Path) -> None:
    """Thirteen columns with long headers (the privacy study's table): headers wrap, the table fits."""
    header = ["obfuscation", "DP unit", "ε", "noise z", "image AUROC", "AUC-sPRO@0.05", "inversion PSNR (dB)",
              "inversion SSIM", "chance PSNR", "average-look PSNR", "membership AUC", "MB sent", "time (s)"]
    rows = [["average+shuffle+switch_row", "embedding", "∞ (no DP)", "1.23", "0.912", "0.456", "12.34", "0.123",
             "11.11", "13.57", "0.512", "1.23", "123"]] * 4
    doc = Document("Wide table")
    doc.add(Table(header, rows))
    _, report_html = doc.write(tmp_path / "wide")
    assert_reads_well(measure(report_html, tmp_path / "profile"), 0)
