"""The HTML report rendered by a real browser (Debian's `chromium`, headless): every plot decodes
and has a size, with the network switched off. The screenshot stays in pytest's tmp dir."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator import report
from tests.report_fixture import write_run

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Added to a copy of the report only (the report itself has no scripts): once the page has
# loaded, mark each plot with the size the browser decoded, or "broken".
PROBE = (
    '<script>window.addEventListener("load", () => {'
    ' for (const img of document.querySelectorAll("img.plot")) {'
    '  img.setAttribute("data-rendered", img.complete && img.naturalWidth > 0'
    '   ? img.naturalWidth + "x" + img.naturalHeight : "broken"); }'
    ' document.body.setAttribute("data-probe", "done"); });</script></body>'
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--proxy-server=127.0.0.1:9",  # any network request would fail
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)",
)
def test_report_renders_every_plot_in_headless_chromium(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "run-a"), write_run(tmp_path / "run-b", node_names=False)]
    html_path = report.write_report(runs, tmp_path / "report.html")
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE))

    res = chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-probe="done"' in dom, dom[-2000:]
    rendered = dict(re.findall(r'data-plot="(\w+)"[^>]*data-rendered="([^"]+)"', dom))
    if not rendered:  # attribute order is the serializer's choice
        rendered = {
            m.group(2): m.group(1)
            for m in re.finditer(r'data-rendered="([^"]+)"[^>]*data-plot="(\w+)"', dom)
        }
    assert set(rendered) == set(report.PLOT_FILES), rendered
    for name, size in rendered.items():
        width, height = (int(v) for v in size.split("x"))
        assert width >= 600 and height >= 300, (name, size)

    shot = tmp_path / "report.png"
    res = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", html_path.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
