"""Re-running a job keeps what it already finished: whole jobs (same config) and single images."""

import hashlib

from conftest import run_job_in


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_job_cut_short_keeps_its_drawn_images_and_draws_only_the_rest(tmp_path):
    overrides = ("seed=[0,1,2]", "steps=4", "sampling.batch_size=1", "scheduler=euler_a")
    first = run_job_in(tmp_path, *overrides)
    images = [tmp_path / r["image_path"] for r in first]
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in images}
    # as if the process died after drawing two images: no rows yet, the third image missing
    (tmp_path / "rows.parquet").unlink()
    images[2].unlink()

    again = run_job_in(tmp_path, *overrides)
    assert [r["status"] for r in again] == ["ok"] * 3
    assert [r["image_sha256"] for r in again] == [r["image_sha256"] for r in first]  # same pixels, same bytes
    for p in images[:2]:  # kept, not redrawn
        assert p.stat().st_mtime_ns == before[p.name][1]
    assert sha(images[2]) == before[images[2].name][0]


def test_images_of_another_config_are_not_kept(tmp_path):
    first = run_job_in(tmp_path, "seed=[0,1]", "steps=3")
    images = [tmp_path / r["image_path"] for r in first]
    before = [(sha(p), p.stat().st_mtime_ns) for p in images]
    (tmp_path / "rows.parquet").unlink()
    changed = run_job_in(tmp_path, "seed=[0,1]", "steps=3", "guidance=2")
    assert [tmp_path / r["image_path"] for r in changed] == images  # the same file names, each drawn again
    for path, row, (old_sha, old_mtime) in zip(images, changed, before, strict=True):
        assert row["image_sha256"] == sha(path) != old_sha and path.stat().st_mtime_ns != old_mtime


def test_a_flow_job_whose_images_were_all_kept_records_the_schedule_it_drew_with(tmp_path):
    """Nothing left to draw, so the job sets the schedule only to record it: as its family's loop set it (tiny-flux:
    the model's shift and a `mu` from the image size), not a plain set_timesteps (which fails there for want of mu)."""
    overrides = ("model=tiny-flux", "scheduler=flow_dpmpp_2m", "steps=3")
    first, = run_job_in(tmp_path, *overrides)
    schedule = (tmp_path / "schedule.csv").read_text()
    (tmp_path / "rows.parquet").unlink()  # as if the process died after saving its image
    (tmp_path / "schedule.csv").unlink()
    again, = run_job_in(tmp_path, *overrides)
    assert again["status"] == "ok", again["error"]
    assert again["image_sha256"] == first["image_sha256"] and again["shift_mu"] == first["shift_mu"] is not None
    assert (tmp_path / "schedule.csv").read_text() == schedule
