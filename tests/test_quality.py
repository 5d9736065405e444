"""Quality against cost, with confidence: bootstrap CIs, the frontier, distribution metrics, converged references,
the frontier figure and table, and the multi-objective search (README "Quality against cost")."""

import shutil

import numpy as np
import pandas as pd
import pytest

from runner import results
from tests.conftest import run_cli


def cells_frame(values_by_cell: dict, seed_column: bool = True) -> pd.DataFrame:
    """A results-like frame: one ok row per image, `values_by_cell[(scheduler, steps)]` its metric values."""
    rows = [dict(scheduler=s, steps=n, seed=i, prompt="p", status="ok", metric=v, nfe=n)
            for (s, n), values in values_by_cell.items() for i, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_summary_ci_narrows_as_seeds_grow_and_is_deterministic():
    draws = np.random.default_rng(1).normal(0.7, 0.2, 256)
    widths = []
    for n in (8, 32, 128):
        row = results.summary(cells_frame({("ddim", 10): draws[:n]}), metrics="metric").iloc[0]
        assert row["n"] == n and row["ci_low"] < row["mean"] < row["ci_high"]
        assert np.isclose(row["mean"], draws[:n].mean())
        widths.append(row["ci_high"] - row["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.5 * widths[0]  # about 1/sqrt(n): 4x the images, half the width
    df = cells_frame({("ddim", 10): draws[:32], ("unipc", 10): draws[32:64]})
    pd.testing.assert_frame_equal(results.summary(df, metrics="metric", seed=3), results.summary(df, metrics="metric", seed=3))
    # a cell's interval does not depend on the other cells in the frame
    alone = results.summary(cells_frame({("ddim", 10): draws[:32]}), by=["scheduler", "steps"], metrics="metric")
    both = results.summary(df, by=["scheduler", "steps"], metrics="metric")
    assert np.isclose(alone.iloc[0]["ci_low"], both.iloc[0]["ci_low"])


def test_summary_leaves_out_failed_and_infinite_values_and_gives_no_interval_for_one_image():
    df = cells_frame({("ddim", 10): [1.0, 2.0, np.inf, 3.0], ("unipc", 10): [5.0]})
    df.loc[1, "status"] = "failed"
    table = results.summary(df, metrics="metric").set_index("scheduler")
    assert table.loc["ddim", "n"] == 2 and table.loc["ddim", "mean"] == 2.0
    assert table.loc["unipc", "n"] == 1 and np.isnan(table.loc["unipc", "ci_low"])
    assert not results.different(table.loc["ddim"], table.loc["unipc"])  # no interval: never called different


def test_overlapping_intervals_are_not_called_different():
    assert results.different((0.1, 0.2), (0.3, 0.4)) and results.different((0.3, 0.4), (0.1, 0.2))
    assert not results.different((0.1, 0.3), (0.2, 0.4))
    assert not results.different((0.1, 0.2), (0.2, 0.3))  # touching intervals overlap
    rng = np.random.default_rng(0)
    same = results.summary(cells_frame({("a", 1): rng.normal(0.5, 0.2, 16), ("b", 1): rng.normal(0.5, 0.2, 16)}),
                           metrics="metric")
    assert not results.different(same.iloc[0], same.iloc[1])  # two draws of the same distribution
    apart = results.summary(cells_frame({("a", 1): rng.normal(0.2, 0.05, 16), ("b", 1): rng.normal(0.8, 0.05, 16)}),
                            metrics="metric")
    assert results.different(apart.iloc[0], apart.iloc[1])


def dominates(a, b) -> bool:
    return a["nfe"] <= b["nfe"] and a["metric"] >= b["metric"] and (a["nfe"] < b["nfe"] or a["metric"] > b["metric"])


def test_frontier_never_returns_a_dominated_cell_and_misses_no_undominated_one():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_cells = int(rng.integers(1, 12))
        cells = {(f"s{int(rng.integers(0, 4))}", int(rng.integers(1, 6))): rng.integers(0, 4, int(rng.integers(1, 4))) / 4
                 for _ in range(n_cells)}  # coarse values: ties in cost and quality happen
        df = cells_frame(cells)
        means = df.groupby(["scheduler", "steps"]).agg(nfe=("nfe", "mean"), metric=("metric", "mean")).reset_index()
        front = results.frontier(df, "metric", "nfe", by=["scheduler", "steps"])
        on_front = set(zip(front["scheduler"], front["steps"]))
        for cell in means.to_dict("records"):
            is_dominated = any(dominates(other, cell) for other in means.to_dict("records"))
            assert ((cell["scheduler"], cell["steps"]) in on_front) == (not is_dominated), (trial, cell)
        assert list(front["nfe"]) == sorted(front["nfe"])


def test_frontier_lower_is_better_and_time_cost():
    df = cells_frame({("a", 1): [10.0], ("b", 2): [5.0], ("c", 3): [7.0]}).assign(time_per_image_s=[0.3, 0.1, 0.2])
    assert list(results.frontier(df, "metric", "nfe", higher_is_better=False)["scheduler"]) == ["a", "b"]
    assert list(results.frontier(df, "metric", "time_per_image_s", higher_is_better=False)["scheduler"]) == ["b"]
    assert list(results.frontier(df, "metric", "time_per_image_s")["scheduler"]) == ["b", "c", "a"]


# Distribution metrics (runner.fid) -------------------------------------------------------------------------------

def test_fid_and_kid_are_near_zero_for_real_vs_real_and_large_for_noise():
    from runner.fid import reference_scale

    scale = reference_scale()
    real, halves, noise = (scale[k] for k in ("real vs real (train vs held-out)", "real vs real (held-out halves)",
                                              "noise vs real"))
    for same in (real, halves):
        assert 0 <= same["fid"] < 0.05 * noise["fid"]
        assert abs(same["kid"]) < 2 * same["kid_std"] + 1e-9 < 0.1 * noise["kid"]  # real vs real: KID ≈ 0 within its spread
    assert noise["kid"] > 3 * noise["kid_std"] > 0


def digit_sweep(sweep, cells: dict):
    """A sweep dir without a model: one job per cell, each image a picture from `cells[scheduler]`, scored."""
    from runner.digits import score_digits
    from runner.jobdir import ROWS_FILE
    from runner.record import save_image, write_table

    for job_num, (scheduler, pictures) in enumerate(cells.items()):
        job_dir = sweep / str(job_num)
        rows = []
        for seed, picture in enumerate(pictures):
            row = dict(model="fake", scheduler=scheduler, steps=4, guidance=7.5, seed=seed, prompt="", height=32,
                       width=32, job_dir=str(job_dir.resolve()), sweep_dir=str(sweep.resolve()), job_num=job_num,
                       overrides=f"scheduler={scheduler}", config_hash="fake", latent_path="", time_total_s=1.0,
                       status="ok", error="", **score_digits([picture])[0])
            row["image_path"], row["image_sha256"] = save_image(job_dir, f"{seed:03d}_seed{seed}", picture, row)
            rows.append(row)
        write_table(job_dir / ROWS_FILE, rows)
    return sweep


def test_distribution_columns_per_cell_and_small_cells_skipped(tmp_path, caplog):
    from runner.digits import load_digit_split, render_digits
    from runner.fid import add_distribution

    train_x = load_digit_split()[0]
    rng = np.random.default_rng(0)
    sweep = digit_sweep(tmp_path / "sweep", {"real": render_digits(train_x[:96]),
                                             "noise": rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8),
                                             "small": render_digits(train_x[96:100])})
    with caplog.at_level("INFO", logger="runner"):
        df = add_distribution(results.load(sweep), min_images=32)
    assert "skipped for 1 cell(s) of fewer than 32 images" in caplog.text
    cell = df.groupby("scheduler")[["fid_digits", "kid_digits", "kid_digits_std"]]
    assert (cell.nunique() <= 1).all().all()  # one value per cell, on each of its rows
    means = cell.mean()
    assert means.loc["noise", "fid_digits"] > 10 * means.loc["real", "fid_digits"]
    assert means.loc["real", "kid_digits"] + 2 * means.loc["real", "kid_digits_std"] < \
        means.loc["noise", "kid_digits"] - 2 * means.loc["noise", "kid_digits_std"]
    assert df[df["scheduler"] == "small"]["fid_digits"].isna().all()


def test_clip_features_need_local_weights(tmp_path):
    from runner.checks import ConfigError
    from runner.fid import features

    with pytest.raises(ConfigError, match=r"clip_model=.* is not allowed: .*local"):
        features([np.zeros((32, 32, 3), np.uint8)] * 2, "clip", str(tmp_path / "no-such-clip"))


# Converged references (runner.reference) ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_reference_that_has_not_converged_is_flagged_and_references_are_reused(small_sweep, tmp_path, caplog):
    from runner.convergence import add_convergence, distances
    from runner.reference import converged_references

    df = results.load(small_sweep)
    df = df[(df["scheduler"] == "ddim") & (df["steps"] == 2) | (df["scheduler"] == "euler_a") & (df["steps"] == 4)]
    few = converged_references(df, tmp_path / "cache", steps=4, tolerance_db=40)
    assert len(few) == 2 and not few["ref_converged"].any()  # 2 and 4 steps of DPM++ 2M disagree
    assert (few["ref_check_psnr"] < 40).all() and (few["ref_tolerance_db"] == 40).all()
    many = converged_references(df, tmp_path / "cache", steps=60, tolerance_db=40)
    assert many["ref_converged"].all() and (many["ref_check_psnr"] >= 40).all()
    assert set(many["scheduler"]) == {"dpmpp_2m"} and set(many["steps"]) == {60}

    before = sorted(p for p in (tmp_path / "cache").rglob("*.png"))
    with caplog.at_level("INFO", logger="runner"):
        out = add_convergence(df, reference="auto", cache=tmp_path / "cache", steps=60, tolerance_db=40)
    assert "drawing" not in caplog.text and sorted((tmp_path / "cache").rglob("*.png")) == before  # cached
    assert out["ref_converged"].all() and set(out["ref_steps"]) == {60} and np.isfinite(out["psnr_to_ref"]).all()
    assert out.set_index("scheduler")["stochastic"].to_dict() == {"ddim": False, "euler_a": True}
    # each image is compared with the reference of its own seed
    for row in out.to_dict("records"):
        ref = many[many["seed"] == row["seed"]].iloc[0]
        assert np.isclose(row["psnr_to_ref"], distances(row["image_path"], ref["image_path"])["psnr_to_ref"])


@pytest.fixture(scope="module")
def quality_sweep(tmp_path_factory):
    """A real sweep whose end draws converged references (few steps, to stay fast) and FID/KID for its 3-image cells."""
    root = tmp_path_factory.mktemp("quality")
    result = run_cli("-m", "scheduler=ddim,dpmpp_2m", "steps=2,4", "seed=[0,1,2]", "sampling.progress=false",
                     f"hydra.sweep.dir={root / 'sweep'}", "hydra.callbacks.sweep_results.reference=auto",
                     "hydra.callbacks.sweep_results.reference_steps=8",
                     f"hydra.callbacks.sweep_results.reference_cache={root / 'references'}",
                     "hydra.callbacks.sweep_results.distribution_min_images=3", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sweep"


@pytest.mark.slow
def test_the_sweep_end_adds_converged_references_and_distribution_columns(quality_sweep):
    table = pd.read_parquet(quality_sweep / "results.parquet")
    assert set(table["ref_scheduler"]) == {"dpmpp_2m"} and set(table["ref_steps"]) == {8}
    assert table["ref_converged"].notna().all() and set(table["ref_tolerance_db"]) == {40}
    assert not table["stochastic"].any()
    assert table["fid_digits"].notna().all() and table.groupby(["scheduler", "steps"])["fid_digits"].nunique().eq(1).all()
    loaded = results.load(quality_sweep)  # the job rows get the sweep's columns back
    assert loaded["kid_digits"].notna().all() and loaded["ref_check_psnr"].notna().all()


# The frontier figure and the paper table (runner.quality) --------------------------------------------------------

@pytest.mark.slow
def test_frontier_figure_has_a_line_per_sampler_with_ci_bars_and_marks_the_frontier(quality_sweep):
    from runner.quality import frontier_figure

    df = results.load(quality_sweep)
    fig = frontier_figure(df, "psnr_to_ref")
    lines = {t.name: t for t in fig.data}
    assert set(lines) == {"ddim", "dpmpp_2m", "frontier"}
    cells = results.summary(df, by=["scheduler", "steps"], metrics="psnr_to_ref").set_index(["scheduler", "steps"])
    for scheduler in ("ddim", "dpmpp_2m"):
        trace = lines[scheduler]
        assert list(trace.x) == [2, 4]  # NFE of 2 and 4 steps
        expected = cells.loc[scheduler]
        assert np.allclose(trace.y, expected["mean"])
        assert np.allclose(np.array(trace.y) + np.array(trace.error_y.array), expected["ci_high"])
        assert np.allclose(np.array(trace.y) - np.array(trace.error_y.arrayminus), expected["ci_low"])
    front = results.frontier(df, "psnr_to_ref", "nfe", by=["scheduler", "steps"])
    assert list(lines["frontier"].x) == list(front["nfe"]) and np.allclose(lines["frontier"].y, front["psnr_to_ref"])


@pytest.mark.slow
def test_paper_table_rows_samplers_columns_nfe_and_ties_in_bold(quality_sweep):
    from runner.quality import paper_table, paper_table_html

    df = results.load(quality_sweep)
    table = paper_table(df, "prompt_adherence")
    assert list(table.index) == ["ddim", "dpmpp_2m"] and list(table.columns) == [2, 4]
    cell = results.summary(df[(df["scheduler"] == "ddim") & (df["steps"] == 4)], metrics="prompt_adherence").iloc[0]
    mean, half = map(float, table.loc["ddim", 4].split(" ± "))  # to the half-width's second significant digit
    assert np.isclose(mean, cell["mean"], atol=half / 10) and np.isclose(half, (cell["ci_high"] - cell["ci_low"]) / 2,
                                                                         rtol=0.1)
    page = paper_table_html(df, "prompt_adherence")
    cells = results.summary(df, by=["scheduler", "steps"], metrics="prompt_adherence").set_index(["scheduler", "steps"])
    for steps in (2, 4):
        a, b = cells.loc[("ddim", steps)], cells.loc[("dpmpp_2m", steps)]
        bold = [f"<b>{html_text}</b>" in page for html_text in (table.loc["ddim", steps], table.loc["dpmpp_2m", steps])]
        assert bold == ([True, True] if not results.different(a, b) else [a["mean"] > b["mean"], b["mean"] > a["mean"]])


@pytest.mark.slow
def test_report_has_the_quality_section_and_keeps_the_sweeps_converged_references(quality_sweep, tmp_path):
    from runner.report import write_report

    page = write_report(results.load(quality_sweep), tmp_path / "report").read_text()
    assert "<h2>Quality against cost</h2>" in page and page.count("class=\"plotly-graph-div\"") >= 3
    assert "References: converged solutions" in page and "class='paper'" in page


# The multi-objective search (experiments/nfe_search.yaml) -------------------------------------------------------

@pytest.mark.slow
def test_optimize_names_are_checked(tmp_path):
    result = run_cli("+optimize=[prompt_adherence,sharpness]", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: optimize='sharpness' is not allowed: a list of: prompt_adherence")


@pytest.mark.slow
def test_a_search_into_a_used_sweep_dir_is_refused_even_appended(small_sweep, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e '.[search]'")
    sweep = tmp_path / "sweep"
    shutil.copytree(small_sweep, sweep)  # a used sweep dir: a copy of the shared one (drawn once, kept as it is)
    before = sorted((p, p.stat().st_mtime_ns) for p in sweep.rglob("*") if p.is_file())
    for append in ([], ["+append=true"]):  # a search numbers its trials from 0: it would write over job 0
        result = run_cli("-m", "experiment=nfe_search", "hydra.sweeper.search.n_trials=2", *append,
                         f"hydra.sweep.dir={sweep}", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith(f"error: hydra.sweep.dir={str(sweep)!r} is not "
                                                                   "allowed: "), result.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in sweep.rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_search_finishes_with_a_pareto_set_non_dominated_among_its_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the search extra: pip install -e '.[search]'")
    from omegaconf import OmegaConf

    sweep = tmp_path / "search"
    result = run_cli("-m", "experiment=nfe_search", "hydra.sweeper.search.n_trials=6", "hydra.sweeper.search.n_jobs=3",
                     "hydra.sweeper.search.sampler.population_size=3", "hydra.sweeper.search.params.steps='int(interval(2, 6))'",
                     "seed=[0,1]", "prompt=[a handwritten digit three,a handwritten digit seven]",
                     "sampling.progress=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.read_parquet(sweep / "results.parquet")
    trials = rows.groupby("job_dir").agg(prompt_adherence=("prompt_adherence", "mean"), nfe=("nfe", "mean"),
                                         scheduler=("scheduler", "first"), steps=("steps", "first"), n=("seed", "size"))
    assert len(trials) == 6 and (trials["n"] == 4).all()  # every trial's rows, 2 prompts x 2 seeds
    pareto = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))["solutions"]
    assert pareto
    points = trials[["prompt_adherence", "nfe"]].to_numpy()
    for solution in pareto:
        adherence, nfe = solution["values"]
        assert np.isclose(points, [adherence, nfe]).all(axis=1).any()  # a trial's own objectives, as the job returned
        better = (points[:, 0] >= adherence) & (points[:, 1] <= nfe) & ((points[:, 0] > adherence) | (points[:, 1] < nfe))
        assert not better.any(), (solution, trials)
