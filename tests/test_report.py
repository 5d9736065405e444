import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import fake_sweep


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Appended to a copy of the page: after load, write what rendered into the DOM, where --dump-dom can read it.
PROBE = """<script>
window.addEventListener('load', () => {
  const widths = [...document.images].map(i => i.naturalWidth);
  const th = [...document.querySelectorAll('#results th')].find(h => h.textContent === 'steps');
  sortBy(th); sortBy(th);  // descending by steps
  const steps = [...document.querySelectorAll('#results tbody tr')].map(
      r => r.children[th.cellIndex].textContent);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({widths, steps});
  document.body.appendChild(probe);
});
</script>"""


def run_report(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runner.report", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def report(small_sweep, tmp_path_factory):
    """The report of a copy of the shared sweep, made as a user types it, from another directory."""
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    shutil.copytree(small_sweep, sweep)
    # an older sweep: its aggregated table has no convergence columns; the report computes them
    pd.read_parquet(sweep / "results.parquet").drop(columns=["psnr_to_ref", "ssim_to_ref"]).to_parquet(
        sweep / "results.parquet")
    result = run_report(sweep, cwd=tmp_path_factory.mktemp("elsewhere"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sweep / "report" / "report.html")
    return sweep / "report"


def test_report_files_and_table(report):
    page = (report / "report.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["convergence.png", "grid_sweep_00.png", "grid_sweep_01.png", "log_snr_schedule.png",
                    "mem_peak_rss_mb.png", "prompt_adherence.png", "sigma_schedule.png", "time_per_image.png",
                    "time_per_step.png"]  # no CUDA memory charts on CPU, no clip_score chart without CLIP weights
    assert page.count("<img src='data:image/png;base64,") == len(pngs)  # self-contained: every picture inline
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page)  # nothing fetched from a network
    rows = re.findall(r"<tr><td>(.*?)</td>", page)
    assert len(rows) == 8 and set(rows) == {"sweep"}
    assert "columns: scheduler, rows: steps, pages: seed" in page
    assert "<th onclick='sortBy(this)'>prompt_adherence</th>" in page  # the default model's metric columns
    assert "reference: ddim at 4 steps" in page
    assert page.count("<td>inf</td>") == 2  # psnr_to_ref recomputed: the two reference images


def test_report_of_two_sweeps_and_out(small_sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_sweep, other)
    result = run_report(small_sweep, other, "--out", tmp_path / "both", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "both" / "report.html").read_text()
    assert len(re.findall(r"<tr><td>", page)) == 16 and "grid_other_00.png" in page and "grid_sweep_00.png" in page
    assert not (small_sweep / "report").exists()


def test_report_bad_path(tmp_path):
    result = run_report(tmp_path / "nope", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: path=") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_report_in_headless_chromium(report, tmp_path):
    import json

    probed = report / "probed.html"
    probed.write_text((report / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom.stdout)
    assert match, dom.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(probe["widths"]) == 9 and all(w > 0 for w in probe["widths"])  # every grid and chart rendered
    assert probe["steps"] == ["4"] * 4 + ["2"] * 4  # the table has the sweep's 8 rows, and sorts

    screenshot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1400,2400", f"--screenshot={screenshot}",
                    (report / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    assert Image.open(screenshot).size == (1400, 2400)
    print(f"report screenshot: {screenshot}")


def test_report_with_a_failed_point(small_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)
    refused = pd.read_parquet(sweep / "0" / "rows.parquet").iloc[:1].assign(
        steps="abc", status="failed", error="steps='abc' is not allowed: an integer >= 1", image_path="",
        image_sha256="", latent_path="")
    (sweep / "4").mkdir()
    refused.to_parquet(sweep / "4" / "rows.parquet")
    result = run_report(sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (sweep / "report" / "report.html").read_text()
    assert len(re.findall(r"<tr><td>", page)) == 9 and page.count("<td>failed</td>") == 1
    assert "9 image(s), 8 ok, 1 failed" in page


def test_report_out_removes_only_pictures_of_its_own_earlier_report(tmp_path):
    from runner.report import main

    sweep = fake_sweep(tmp_path / "sweep")
    out = tmp_path / "shared"
    out.mkdir()
    (out / "grid_mine.png").write_bytes(b"a colleague's picture")
    assert main([str(sweep), "--out", str(out)]) == 0
    assert {"grid_sweep_00.png", "grid_sweep_01.png", "grid_mine.png"} <= {p.name for p in out.iterdir()}
    # the sweep again with one seed: one grid page fewer; the earlier second page goes, the colleague's file stays
    shutil.rmtree(sweep)
    fake_sweep(sweep, seeds=(0,))
    assert main([str(sweep), "--out", str(out)]) == 0
    grids = sorted(p.name for p in out.glob("grid_*.png"))
    assert grids == ["grid_mine.png", "grid_sweep_00.png"]
    assert (out / "grid_mine.png").read_bytes() == b"a colleague's picture"


def test_report_skips_a_truncated_rows_file(tmp_path):
    from runner.report import main

    sweep = fake_sweep(tmp_path / "sweep")
    rows_file = sweep / "2" / "rows.parquet"
    rows_file.write_bytes(rows_file.read_bytes()[:300])
    assert main([str(sweep)]) == 0
    page = (sweep / "report" / "report.html").read_text()
    assert "6 image(s), 6 ok, 0 failed" in page
