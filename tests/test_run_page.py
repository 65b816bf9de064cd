"""A run ends with one page a person opens: report.html, self-contained, true to report.json,
with the savings the run realised; ``secateurs report`` rebuilds it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from secateurs.cli import main

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Added to a copy of the page only: once the page has loaded (every image fetched and
#: decoded, or failed: then 0x0), writes each image's natural size into the DOM. Waiting on
#: each ``img.decode()`` promise instead raced ``--dump-dom`` on a loaded machine.
PROBE = (
    '<script>window.addEventListener("load", () => { for (const img of document.images) '
    '{ img.setAttribute("data-natural", img.naturalWidth + "x" + img.naturalHeight); } });'
    "</script>"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = main(["run", str(REPO / "recipes" / "quick-synthetic.yaml"), "--out", str(out),
                 "--set", "data.limit_train=256", "--set", "data.limit_test=128",
                 "--set", "output.latency=true"])  # fmt: skip
    assert code == 0
    return out


def _chromium_dom(page: Path, profile: Path) -> tuple[str, list[str]]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make data installs it)")
    result = subprocess.run(
        [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    console = [x for x in result.stderr.splitlines() if ":CONSOLE" in x or "Uncaught" in x]
    return result.stdout, console


def _table(dom: str, table_id: str) -> dict[str, list[str]]:
    """A table of the page as {first cell: the other cells}."""
    match = re.search(rf'<table[^>]*id="{table_id}"[^>]*>(.*?)</table>', dom, flags=re.S)
    assert match, f"no table {table_id}"
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", match.group(1), flags=re.S):
        cells = [
            re.sub(r"<[^>]+>", "", c).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
        ]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def _number(text: str) -> float:
    return float(text.split(" ")[0].replace(",", "").rstrip("%"))


def test_the_page_is_self_contained_true_to_the_json_and_shows_realised_savings(
    run_dir: Path, tmp_path: Path
) -> None:
    page = run_dir / "report.html"
    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    html = page.read_text()
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    for src in re.findall(r'src="([^"]*)"', html):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom, console = _chromium_dom(probe, tmp_path / "profile")
    assert console == [], console
    sizes = re.findall(r'data-natural="(\d+)x(\d+)"', dom)
    assert len(sizes) == len(re.findall(r"<img ", html)) >= 3
    assert all(int(w) > 0 and int(h) > 0 for w, h in sizes)

    d, p = report["dense"], report["pruned"]
    headline = _table(dom, "headline")
    dense_acc, pruned_acc, _ = headline["top-1 accuracy"]
    assert _number(dense_acc) == pytest.approx(100 * d["accuracy"], abs=0.005)
    assert _number(pruned_acc) == pytest.approx(100 * p["accuracy"], abs=0.005)
    assert _number(headline["nonzero parameters"][1]) == p["nonzeros"]
    realised = report["extra"]["realised"]
    saved = _table(dom, "realised")
    file_row = saved[f"file bytes ({realised['file']['name']})"]
    assert _number(file_row[1]) == realised["file"]["file_bytes"]
    assert _number(file_row[0]) == realised["file"]["dense_file_bytes"]
    assert Path(realised["file"]["path"]).stat().st_size == realised["file"]["file_bytes"]
    from_file = saved["top-1 accuracy, loaded from the file"]
    assert _number(from_file[1]) == pytest.approx(100 * realised["file"]["accuracy"], abs=0.005)
    latency = next(v for k, v in saved.items() if k.startswith("latency"))
    assert _number(latency[1]) == pytest.approx(realised["latency"]["pruned_ms"], abs=5e-4)
    for line in realised["why_not"]:
        assert line.split(":")[0] in dom
    assert "The recipe that produced it" in dom and "Versions:" in dom


def test_secateurs_report_rebuilds_the_page_and_refuses_what_is_not_a_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _table((run_dir / "report.html").read_text(), "headline")
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert _table((run_dir / "report.html").read_text(), "headline") == before
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no report.json" in err[0]
    newer = tmp_path / "newer"
    newer.mkdir()
    data = json.loads((run_dir / "report.json").read_text())
    (newer / "report.json").write_text(json.dumps({**data, "format": "secateurs.run-report/99"}))
    assert main(["report", str(newer)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer than this secateurs reads" in err[0]
    assert not (newer / "report.html").exists()
