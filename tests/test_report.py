import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import fake_sweep


def run_report(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runner.report", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def report_data(html_path) -> dict:
    """The viewer's JSON document, as the page's script reads it."""
    page = html_path.read_text()
    return json.loads(re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)[1])


def data_rows(data) -> list[dict]:
    return [dict(zip(data["rows"]["columns"], values)) for values in data["rows"]["data"]]


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


@pytest.mark.slow
def test_report_files_and_table(report):
    page = (report / "report.html").read_text()
    assert sorted(p.name for p in report.glob("*.png")) == ["grid_sweep_00.png", "grid_sweep_01.png"]
    ours, plotly_js = page.split('<script type="text/x-plotly" id="plotly-source">')
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", ours)  # nothing of ours is fetched from a network
    assert "window.Plotly = Plotly" in plotly_js and page.count("window.Plotly = Plotly") == 1  # inline, once
    data = report_data(report / "report.html")
    rows = data_rows(data)
    assert len(rows) == 8 and {r["sweep"] for r in rows} == {"sweep"}
    # every image: an embedded thumbnail (its own PNG: 32 px digits) and the full PNG placed under the report folder
    assert all(i["thumb"].startswith("data:image/png;base64,") and i["exact"] for i in data["images"])
    full = [report / i["full"] for i in data["images"]]
    assert all(p.is_file() and p.stat().st_nlink == 2 for p in full)  # hard links to the sweep's files
    assert [a["key"] for a in data["axes"]] == ["scheduler", "steps", "seed"]  # as typed: scheduler=... steps=...
    assert data["default_axes"] == {"x": "scheduler", "y": "steps", "page": "seed"}
    assert "prompt_adherence" in data["table"]["shown"] and "config" in data["table"]["hidden"]
    assert "reference: ddim at 4 steps" in page
    assert sum(r["psnr_to_ref"] == "inf" for r in rows) == 2  # psnr_to_ref recomputed: the two reference images
    names = [c["name"] for c in data["charts"]]
    assert names == ["sigma_schedule_chart", "convergence_chart", "prompt_adherence_chart", "time_per_image_chart",
                     "time_per_step_chart", "memory_chart"]  # no clip_score chart without CLIP weights
    sigma = data["charts"][0]["figure"]
    assert {t["name"] for t in sigma["data"]} == {"ddim, 2 steps", "ddim, 4 steps", "euler_a, 2 steps",
                                                  "euler_a, 4 steps"}


@pytest.mark.slow
def test_report_of_two_sweeps_and_out(small_sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_sweep, other)
    result = run_report(small_sweep, other, "--out", tmp_path / "both", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "both" / "report.html").read_text()
    data = report_data(tmp_path / "both" / "report.html")
    assert len(data["rows"]["data"]) == 16 and "grid_other_00.png" in page and "grid_sweep_00.png" in page
    assert data["axes"][0] == {"key": "sweep", "values": ["sweep", "other"]}  # as given on the command line
    assert {i["full"].split("/")[1] for i in data["images"]} == {"sweep", "other"}
    assert not (small_sweep / "report").exists()


@pytest.mark.slow
def test_report_bad_path(tmp_path):
    result = run_report(tmp_path / "nope", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: path=") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
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
    data = report_data(sweep / "report" / "report.html")
    rows = data_rows(data)
    assert len(rows) == 9 and [r["status"] for r in rows].count("failed") == 1
    failed = next(n for n, r in enumerate(rows) if r["status"] == "failed")
    assert data["images"][failed] is None and data["commands"][failed] is None
    assert "9 image(s), 8 ok, 1 failed" in page


def test_report_out_removes_only_files_of_its_own_earlier_report(tmp_path):
    from runner.report import main

    sweep = fake_sweep(tmp_path / "sweep")
    out = tmp_path / "shared"
    (out / "images").mkdir(parents=True)
    (out / "grid_mine.png").write_bytes(b"a colleague's picture")
    (out / "images" / "mine.png").write_bytes(b"another")
    assert main([str(sweep), "--out", str(out)]) == 0
    assert {"grid_sweep_00.png", "grid_sweep_01.png", "grid_mine.png"} <= {p.name for p in out.iterdir()}
    assert (out / "images" / "sweep" / "0" / "001_seed1.png").is_file()
    # the sweep again with one seed: one grid page fewer; the earlier second page and the seed-1 images go, the
    # colleague's files stay
    shutil.rmtree(sweep)
    fake_sweep(sweep, seeds=(0,))
    assert main([str(sweep), "--out", str(out)]) == 0
    grids = sorted(p.name for p in out.glob("grid_*.png"))
    assert grids == ["grid_mine.png", "grid_sweep_00.png"]
    assert (out / "grid_mine.png").read_bytes() == b"a colleague's picture"
    assert sorted(p.name for p in (out / "images" / "sweep" / "0").iterdir()) == ["000_seed0.png"]
    assert (out / "images" / "mine.png").read_bytes() == b"another"


def test_report_skips_a_truncated_rows_file(tmp_path):
    from runner.report import main

    sweep = fake_sweep(tmp_path / "sweep")
    rows_file = sweep / "2" / "rows.parquet"
    rows_file.write_bytes(rows_file.read_bytes()[:300])
    assert main([str(sweep)]) == 0
    page = (sweep / "report" / "report.html").read_text()
    assert "6 image(s), 6 ok, 0 failed" in page


def test_axis_values_in_the_order_typed_numbers_numerically(tmp_path):
    from runner import results
    from runner.viewer import viewer_axes

    sweep = fake_sweep(tmp_path / "sweep", schedulers=("euler", "ddim", "unipc"), steps=(10, 2))
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - steps=10,2\n"
                                         "    - scheduler=euler,ddim,unipc\n    - seed=[0,1]\n")
    axes = viewer_axes(results.load(sweep))
    assert axes == [{"key": "steps", "values": [2, 10]}, {"key": "scheduler", "values": ["euler", "ddim", "unipc"]},
                    {"key": "seed", "values": [0, 1]}]


def test_a_swept_key_that_is_no_column_is_an_axis_read_from_the_jobs_overrides(tmp_path):
    from runner import results
    from runner.viewer import add_override_axes, viewer_axes

    sweep = fake_sweep(tmp_path / "sweep", schedulers=("euler",), steps=(2, 4))
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n"
                                         "    - +scheduler.kwargs.use_karras_sigmas=true,false\n")
    for job, karras in (("0", "true"), ("1", "false")):  # as Hydra writes each job's overrides
        (sweep / job / ".hydra").mkdir()
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- +scheduler.kwargs.use_karras_sigmas={karras}\n")
    axes = {a["key"]: a["values"] for a in viewer_axes(add_override_axes(results.load(sweep)))}
    assert axes["scheduler.kwargs.use_karras_sigmas"] == [True, False]


def test_redraw_command_quotes_what_hydra_needs(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    import shlex

    from runner.viewer import redraw_command, redrawn_overrides

    typed = ["scheduler=euler_a", "seed=[0,1]", "hydra.sweep.dir=/x", 'prompt=[a cat,"a, dog"]', "guidance=3"]
    row = {"seed": 1, "prompt": 'a "quoted", [odd] prompt \\'}
    command = redraw_command(row, redrawn_overrides(typed))
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "runner"]
    overrides = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[3:])}
    assert overrides == {"scheduler": "euler_a", "guidance": 3, "seed": 1, "prompt": row["prompt"]}


def test_report_reference_scheduler_and_reference_run(tmp_path):
    """README, Compare sweeps: `--reference-scheduler NAME` and `--reference RUN` pick the reference of the report's
    convergence columns, which it recomputes."""
    from skimage.metrics import peak_signal_noise_ratio

    from runner.record import read_image
    from runner.report import main

    sweep = fake_sweep(tmp_path / "sweep")  # ddim and euler at 2 and 4 steps, seeds 0 and 1
    assert main([str(sweep), "--reference-scheduler", "euler", "--out", str(tmp_path / "euler")]) == 0
    assert "reference: euler at 4 steps" in (tmp_path / "euler" / "report.html").read_text()
    rows = data_rows(report_data(tmp_path / "euler" / "report.html"))
    assert {(r["ref_scheduler"], r["ref_steps"]) for r in rows} == {("euler", 4)}
    assert sorted((r["scheduler"], r["steps"]) for r in rows if r["psnr_to_ref"] == "inf") == [("euler", 4)] * 2

    # a separate reference run, e.g. ddim at more steps than the sweep has: its image of the same content
    reference = fake_sweep(tmp_path / "ddim-8", schedulers=("ddim",), steps=(8,))
    assert main([str(sweep), "--reference", str(reference), "--reference-scheduler", "ddim", "--out",
                 str(tmp_path / "ref")]) == 0
    assert "reference: ddim at 8 steps" in (tmp_path / "ref" / "report.html").read_text()
    rows = data_rows(report_data(tmp_path / "ref" / "report.html"))
    assert len(rows) == 8 and {(r["ref_scheduler"], r["ref_steps"]) for r in rows} == {("ddim", 8)}
    for row in rows:  # PSNR to the reference run's image of the same seed, as scikit-image computes it
        ours = read_image(sweep / row["job"] / "images" / row["image"])
        theirs = read_image(reference / "0" / "images" / row["image"])
        assert row["psnr_to_ref"] == pytest.approx(peak_signal_noise_ratio(theirs, ours, data_range=255))
