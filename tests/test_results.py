import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner import results
from runner.columns import CONVERGENCE_COLUMNS
from runner.convergence import add_convergence
from runner.grid import grid_pages
from runner.record import write_table
from tests.conftest import fake_sweep, read_png, run_job_in


@pytest.mark.slow
def test_load_several_sweeps_pivot_and_best(small_sweep, tmp_path):
    moved = tmp_path / "moved_sweep"
    shutil.copytree(small_sweep, moved)  # a second sweep, and a results tree that was moved
    df = results.load(small_sweep, moved)
    assert len(df) == 16 and set(df["sweep"]) == {"sweep", "moved_sweep"}
    assert all(p.startswith(str(moved)) for p in df[df["sweep"] == "moved_sweep"]["image_path"])

    table = results.pivot(df, "time_per_step_s", "scheduler", "steps")
    assert list(table.index) == ["ddim", "euler_a"] and list(table.columns) == [2, 4]
    expected = df[(df["scheduler"] == "euler_a") & (df["steps"] == 4)]["time_per_step_s"].mean()
    assert table.loc["euler_a", 4] == expected > 0
    # time per step is the job's denoising time shared by its images and steps
    row = df.iloc[0]
    assert np.isclose(row["time_per_step_s"], row["time_denoise_s"] / 2 / row["steps"])

    fastest = results.best(df, "time_per_image_s", "scheduler")
    assert list(fastest["scheduler"]) == ["ddim", "euler_a"]
    for _, row in fastest.iterrows():
        assert row["time_per_image_s"] == df[df["scheduler"] == row["scheduler"]]["time_per_image_s"].min()
    sharpest = results.best(df, "time_per_image_s", ["scheduler", "steps"], lowest=False)
    assert len(sharpest) == 4


@pytest.mark.slow
def test_convergence_columns_written_at_multirun_end(small_sweep):
    df = pd.read_parquet(small_sweep / "results.parquet")
    assert set(df["ref_scheduler"]) == {"ddim"} and set(df["ref_steps"]) == {4}
    reference = df[(df["scheduler"] == "ddim") & (df["steps"] == 4)]
    assert len(reference) == 2
    assert np.isinf(reference["psnr_to_ref"]).all() and (reference["ssim_to_ref"] == 1).all()
    assert (reference["latent_mse_to_ref"] == 0).all()
    others = df.drop(reference.index)
    assert np.isfinite(others["psnr_to_ref"]).all() and (others["ssim_to_ref"] < 1).all()
    assert (others["latent_mse_to_ref"] > 0).all()
    # each image is compared with the reference of its own seed (seed 1 with seed 1), in pixel space
    row = others[(others["scheduler"] == "euler_a") & (others["seed"] == 1)].iloc[0]
    ref = reference[reference["seed"] == 1].iloc[0]
    a, b = (read_png(small_sweep / r["image_path"]).astype(float) for r in (row, ref))  # absolute, or relative
    assert np.isclose(row["psnr_to_ref"], 10 * np.log10(255**2 / np.mean((a - b) ** 2)))


@pytest.mark.slow
def test_convergence_against_a_separate_reference_run(small_sweep, tmp_path):
    run_job_in(tmp_path, "scheduler=ddim", "steps=6", "seed=[0,1]")
    df = add_convergence(results.load(small_sweep), reference=tmp_path)
    assert set(df["ref_steps"]) == {6} and set(df["ref_scheduler"]) == {"ddim"}
    assert np.isfinite(df["psnr_to_ref"]).all()  # no image of the sweep is the reference itself


@pytest.mark.slow
def test_grid_pages_xyz_split_and_failed_cell(small_sweep):
    df = results.load(small_sweep)
    pages = grid_pages(df, "scheduler", "steps", "seed")
    assert [title for title, _ in pages] == ["seed: 0", "seed: 1"]
    whole = pages[0][1]
    split = grid_pages(df, "scheduler", "steps", "seed", max_columns=1, max_rows=1)
    assert [title for title, _ in split[:4]] == [f"seed: 0, part {n}/4" for n in range(1, 5)]
    assert len(split) == 8 and split[0][1].width < whole.width

    failed = df.copy()
    failed.loc[(failed["scheduler"] == "euler_a") & (failed["steps"] == 4), "status"] = "failed"
    image = np.asarray(grid_pages(failed, "scheduler", "steps", "seed")[0][1])
    ok_image = np.asarray(whole)
    assert image.shape == ok_image.shape
    # the failed cell (euler_a column, 4 steps row: bottom right) is a grey blank with a red cross, not an image
    grey = (image[-60:, -60:] == 200).all(axis=-1)
    assert grey.mean() > 0.5 and not (ok_image[-60:, -60:] == 200).all(axis=-1).any()
    assert (image[: image.shape[0] // 2] == ok_image[: ok_image.shape[0] // 2]).all()  # other cells unchanged


def sweep_with_table(tmp_path, portable=True):
    """A fake sweep with its results table as the sweep callback writes it: portable, or with the absolute paths
    of older sweeps. Returns the sweep dir and the table's rows as computed."""
    sweep = fake_sweep(tmp_path / "sweep")
    df = add_convergence(results.load(sweep))
    table = results.portable(df, sweep) if portable else df
    write_table(sweep / "results.parquet", table)
    write_table(sweep / "results.csv", table)
    return sweep, df


def test_sweep_tables_hold_paths_relative_to_the_sweep(tmp_path):
    sweep, df = sweep_with_table(tmp_path)
    moved = tmp_path / "archive" / "sweep"
    shutil.move(sweep, moved)
    for table in (pd.read_parquet(moved / "results.parquet"), pd.read_csv(moved / "results.csv")):
        # plain pandas finds the moved files: sweep dir / image_path
        assert sorted(table["image_path"]) == sorted(p.relative_to(moved).as_posix() for p in moved.glob("*/*/*.png"))
        assert set(map(str, table["job_dir"])) == {"0", "1", "2", "3"} and set(table["sweep_dir"]) == {"."}
    loaded = results.load(moved)
    assert all(p.startswith(str(moved.resolve())) and (moved / p).is_file() for p in loaded["image_path"])


def test_load_of_a_moved_sweep_keeps_the_convergence_columns_of_its_table(tmp_path):
    for portable in (True, False):  # the table of this version, and that of older sweeps (absolute paths)
        sweep, df = sweep_with_table(tmp_path / str(portable), portable)
        assert df["psnr_to_ref"].notna().all() and set(df["ref_scheduler"]) == {"ddim"}
        moved = tmp_path / "moved" / str(portable)
        shutil.move(sweep, moved)
        loaded = results.load(moved / "0", moved)  # a job dir of the sweep, then the whole sweep
        assert len(loaded) == 10
        whole = loaded.iloc[2:].reset_index(drop=True)
        pd.testing.assert_frame_equal(whole[list(CONVERGENCE_COLUMNS)], df[list(CONVERGENCE_COLUMNS)])
        assert list(loaded.iloc[:2]["psnr_to_ref"]) == list(df.iloc[:2]["psnr_to_ref"])

    # an image drawn again since the table was written gets no value of the old one
    job = pd.read_parquet(moved / "1" / "rows.parquet").assign(image_sha256="drawn again")
    write_table(moved / "1" / "rows.parquet", job)
    redrawn = results.load(moved)
    assert redrawn[redrawn["job_num"] == 1]["psnr_to_ref"].isna().all()
    assert redrawn[redrawn["job_num"] != 1]["psnr_to_ref"].notna().all()


def test_load_says_which_rows_are_reproductions(tmp_path):
    tree = tmp_path / "results"
    fake_sweep(tree / "sweeps" / "s1", schedulers=("ddim",), steps=(2,))
    single = pd.read_parquet(tree / "sweeps" / "s1" / "0" / "rows.parquet")
    write_table(tree / "runs" / "r1" / "rows.parquet", single.assign(sweep_dir="", overrides="steps=2"))
    write_table(tree / "reproduce" / "t1" / "0" / "rows.parquet",
                single.assign(sweep_dir="", overrides=f"reproduce {tree / 'sweeps' / 's1' / '0'}"))
    df = results.load(tree)
    assert {Path(j).relative_to(tree.resolve()).as_posix(): set(o) for j, o in df.groupby("job_dir")["origin"]} == \
        {"sweeps/s1/0": {"sweep"}, "runs/r1": {"run"}, "reproduce/t1/0": {"reproduce"}}
    assert len(df[df["origin"] != "reproduce"]) == 4


def test_load_skips_a_truncated_rows_file_with_one_warning(tmp_path, caplog):
    sweep = fake_sweep(tmp_path / "sweep")
    rows_file = sweep / "1" / "rows.parquet"
    rows_file.write_bytes(rows_file.read_bytes()[:300])  # as `head -c 300` leaves it
    with caplog.at_level(logging.WARNING, logger="runner"):
        df = results.load(sweep)
    assert len(df) == 6 and 1 not in set(df["job_num"])
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"skipped {rows_file}"]
