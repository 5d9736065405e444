"""Fused sweeps (`hydra/launcher=fused`, runner/fused.py): points that share a UNet batch are drawn together, and
each point's image is the very file its point drawn alone makes (same image_sha256), its job and rows its own.

One fused CLI sweep: tiny-sd and tiny-sdxl, one batch each holding guidance 0.5 (no unconditional pass) beside 7.5 and
points that differ in seed, prompt and negative prompt, beside a point the config check refuses. Then the same
command resumes it after most points were deleted, with their batches made to raise (RUNNER_FAULT=*:fused): those
points draw alone, and their files must be the ones the fused batch wrote; the points kept are skipped, and
reproduce (which draws alone) gives a kept one's file again. In process, through the compose API: k-diffusion
samplers, SD3 and Flux fuse the same way.
"""

import shutil
from pathlib import Path

import pytest

from conftest import compose_config, run_cli, run_job_in

# One config option per point, so that seed, prompt and negative prompt vary across points without a full product.
PAIRS = {"a": ("a cat", "", 0), "b": ("a dog", "a cow", 1)}
FUSED = ("-m", "hydra/launcher=fused", "model=tiny-sd,tiny-sdxl", "guidance=0.5,7.5", "+pair=a,b,bad", "steps=2",
         "sampling.batch_size=4", "sampling.progress=false")
KEPT = (0, 6)  # one finished point per model kept when the sweep resumes; the others are deleted and drawn again


def write_pairs(conf):
    pair = conf / "pair"
    pair.mkdir(parents=True)
    for name, (prompt, negative, seed) in PAIRS.items():
        (pair / f"{name}.yaml").write_text(f"# @package _global_\nprompt: {prompt}\nnegative_prompt: '{negative}'\n"
                                           f"seed: {seed}\n")
    (pair / "bad.yaml").write_text("# @package _global_\nseed: -1\n")  # refused by the config check


def latent_sha(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rows_of(sweep):
    import runner.results

    return runner.results.load(sweep).sort_values("job_num").reset_index(drop=True)


@pytest.fixture(scope="module")  # fused sweeps through the CLI: the tests that use it are slow
def fused_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    write_pairs(root / "conf")
    args = (*FUSED, f"hydra.searchpath=[file://{root / 'conf'}]", f"hydra.sweep.dir={root / 'sweep'}")
    first = run_cli(*args, cwd=root)
    fused = rows_of(root / "sweep")
    fused["latent_sha"] = [latent_sha(p) if isinstance(p, str) and p else "" for p in fused.latent_path]
    for job in fused[(fused.status == "ok") & ~fused.job_num.isin(KEPT)].job_dir:  # as if never drawn
        for part in ("rows.parquet", "images", "latents"):
            path = root / "sweep" / job / part
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = run_cli(*args, cwd=root, env={"RUNNER_FAULT": "*:fused"})  # every fused batch raises
    return root, first, fused, again, rows_of(root / "sweep")


@pytest.mark.slow
def test_fused_points_share_a_batch_and_a_refused_point_fails_alone(fused_sweep):
    _, first, df, _, _ = fused_sweep
    assert first.returncode == 1, first.stderr  # the refused points fail the sweep, as without fusion
    ok, refused = df[df.status == "ok"], df[df.status != "ok"]
    assert len(ok) == 8 and len(refused) == 4 and refused.error.str.contains("seed=-1 is not allowed").all()
    # every good point drawn in its model's one batch, which mixes guidance 0.5 and 7.5, seeds, prompts, negatives
    assert ok.fused_group.notna().all() and (ok.fused_batch_size == 4).all()
    assert ok.groupby("model").fused_group.nunique().to_dict() == {"tiny-sd": 1, "tiny-sdxl": 1}
    for _, batch in ok.groupby("model"):
        assert set(batch.guidance) == {0.5, 7.5} and batch.seed.nunique() == batch.prompt.nunique() == 2
        assert batch.negative_prompt.nunique() == 2
        passes = batch.unet_evals / batch.nfe  # the network's passes per evaluation: as each point drawn alone
        assert (passes[batch.guidance == 0.5] == 1).all() and (passes[batch.guidance == 7.5] == 2).all()
    # time columns: each point's share of its batch (a quarter of it, one image of four)
    assert (ok.time_denoise_s > 0).all() and (ok.time_total_s > ok.time_denoise_s).all()


@pytest.mark.slow
def test_points_drawn_alone_are_the_files_their_fused_batch_wrote(fused_sweep):
    _, _, fused, again, resumed = fused_sweep
    assert again.returncode == 1, again.stderr
    log = again.stdout + again.stderr
    assert log.count("already done") == len(KEPT)
    # the finished points are left out of the batches: each model's batch holds its 3 deleted points, and raises
    assert log.count("failed (RuntimeError: fused batch fault injected by RUNNER_FAULT); its 3 point(s) draw alone") == 2
    ok = resumed[resumed.status == "ok"]
    redrawn = ok[~ok.job_num.isin(KEPT)]
    assert len(redrawn) == 6 and redrawn.fused_group.isna().all()  # the batch raised: each point drew alone
    before = fused.set_index("job_num")
    for _, row in ok.iterrows():  # guidance 0.5 and 7.5, both models, every seed, prompt and negative prompt
        assert row.image_sha256 == before.image_sha256[row.job_num], (row.model, row.guidance, row.seed, row.prompt)
    # the final latents too (float32 .npy, finer than the 8-bit PNG): the one of a point drawn alone is in its
    # job dir now, and the fused batch's one was read before it was deleted
    for _, row in redrawn.iterrows():
        assert latent_sha(row.latent_path) == before.latent_sha[row.job_num], (row.model, row.guidance, row.seed)


@pytest.mark.slow
def test_a_fused_point_reproduces_alone(fused_sweep, tmp_path):
    import runner.reproduce

    root, _, fused, _, _ = fused_sweep
    job = fused[fused.job_num == KEPT[-1]].job_dir.iloc[0]  # tiny-sdxl's kept point: its fused file, drawn alone
    assert runner.reproduce.main([str(root / "sweep" / job), "--out", str(tmp_path / "again")]) == 0


@pytest.mark.slow
def test_a_dry_run_lists_the_fused_batches(tmp_path):
    result = run_cli("-m", "hydra/launcher=fused", "model=tiny-sd", "scheduler=ddim,euler", "guidance=1,7.5", "seed=0,1",
                     "dry_run=true", f"dry_run_results={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fused: 2 batch(es) in 2 group(s) hold 8 of 8 job(s)" in result.stdout
    assert "group 0: jobs 0 1 2 3: 4 image(s) in one batch" in result.stdout
    assert "group 1: jobs 4 5 6 7: 4 image(s) in one batch" in result.stdout
    assert "total, fused:" in result.stdout and not (tmp_path / "results").exists()


# Points that differ in guidance (1: no unconditional pass, beside 7.5), seed, prompt and negative prompt.
POINTS = ((1.0, 0, "a cat", ""), (7.5, 1, "a dog", "a cow"), (7.5, 0, "a cat", ""))


@pytest.mark.parametrize("model, scheduler", [("tiny-sd", "k_dpmpp_2m_sde"), ("tiny-sdxl", "k_euler_a"),
                                              ("tiny-sd3", "flow_euler_sde"), ("tiny-sd3", "flow_dpmpp_2m"),
                                              ("tiny-flux", "flow_dpmpp_2m")])
def test_k_diffusion_and_flow_points_fuse_and_each_image_and_schedule_is_its_point_drawn_alone(model, scheduler,
                                                                                               tmp_path):
    """Stochastic samplers, whose noise must come from each point's own generator; flow_dpmpp_2m takes the model's
    shift (tiny-sd3: 3.0) and, on tiny-flux, a `mu` from the image size: the schedule a fused job records (it walks
    none itself) must be the one its batch walked."""
    from runner.context import standalone
    from runner.draw import draw
    from runner.fused import Point, draw_batch, group
    from runner.spec import make_spec

    points, alone, contexts = [], [], []
    for i, (guidance, seed, prompt, negative) in enumerate(POINTS):
        overrides = (f"model={model}", f"scheduler={scheduler}", "steps=2", f"guidance={guidance}", f"seed={seed}",
                     f"prompt='{prompt}'", f"negative_prompt='{negative}'")
        alone.append(run_job_in(tmp_path / f"alone-{i}", *overrides)[0])
        cfg = compose_config(*overrides, "device=cpu", "sampling.progress=false")
        contexts.append(standalone(cfg, tmp_path / f"fused-{i}"))
        points.append(Point(i, make_spec(cfg), contexts[-1].job_dir, contexts[-1].config_hash, i))
    groups = group(points)
    assert [[[p.index for p in batch] for batch in batches] for batches in groups] == [[[0, 1, 2]]]
    assert draw_batch(groups[0][0], 0)
    for point, context, own in zip(points, contexts, alone):
        row = draw(point.spec, Path(point.job_dir), context)[0]
        assert row["status"] == "ok" and row["fused_group"] == 0 and row["fused_batch_size"] == 3
        assert row["image_sha256"] == own["image_sha256"], (point.index, point.spec.guidance, point.spec.seeds)
        assert (row["nfe"], row["unet_evals"]) == (own["nfe"], own["unet_evals"])
        schedule = (Path(point.job_dir) / "schedule.csv").read_text()
        assert schedule == (tmp_path / f"alone-{point.index}" / "schedule.csv").read_text()
        assert row["shift_mu"] == own["shift_mu"]
