"""Honest cost: the dry run plans each job's model evaluations as its loop will count them (`nfe`), and prices
them at the per-evaluation time of earlier rows, so a Heun job is not estimated like a one-call sampler."""

import pandas as pd
import pytest

from conftest import compose_config, run_job_in
from runner.dry_run import planned_nfe, rates
from runner.spec import make_spec

STEPS = 5


@pytest.mark.parametrize("overrides, expected", [
    (("scheduler=euler",), STEPS),
    (("scheduler=heun",), 2 * STEPS - 1),
    (("scheduler=pndm",), STEPS + 1),  # PLMS without Runge-Kutta warm-up evaluates its first step twice
    (("scheduler=dpmpp_2m", "schedule=karras"), STEPS),
    (("scheduler=k_dpmpp_2m",), STEPS),
    (("scheduler=k_heun",), 2 * STEPS - 1),
    (("scheduler=k_dpm_2",), 2 * STEPS - 1),
    (("scheduler=k_dpmpp_sde",), 2 * STEPS - 1),
])
def test_planned_evaluations_are_what_the_loop_counts(overrides, expected, tmp_path):
    spec = make_spec(compose_config("model=tiny-sd", f"steps={STEPS}", *overrides))
    assert planned_nfe(spec) == expected
    rows = run_job_in(tmp_path, "model=tiny-sd", f"steps={STEPS}", *overrides)
    assert rows[0]["status"] == "ok", rows[0]["error"]
    assert rows[0]["nfe"] == expected


def test_img2img_plans_only_the_steps_it_runs(tmp_path):
    spec = make_spec(compose_config("model=tiny-sd", "scheduler=heun", "steps=10", "strength=0.6",
                                    "init_image=runner/models/digits-classifier/config.json"))
    assert planned_nfe(spec) == 2 * 6 - 1  # int(10 * 0.6) = 6 Heun steps


def history(**columns):
    base = dict(status="ok", model="tiny-sd", device="cpu", dtype="fp32", model_cached=True, time_load_s=0.0,
                time_includes_warmup=False, images_per_s=0.1)
    return pd.DataFrame([{**base, **row} for row in pd.DataFrame(columns).to_dict("records")])


def test_rates_are_per_evaluation_where_rows_have_nfe():
    # two earlier jobs of one image each: euler (5 evaluations, 5 s) and heun (9 evaluations, 9 s): 1 s each
    rows = history(scheduler=["euler", "heun"], steps=[5, 5], nfe=[5, 9], time_denoise_s=[5.0, 9.0],
                   time_total_s=[10.0, 10.0])
    spec = make_spec(compose_config("model=tiny-sd", "scheduler=heun", "steps=5"))
    per_eval, per_image, _ = rates(rows, spec)
    assert per_eval == pytest.approx(1.0)
    assert planned_nfe(spec) * per_eval == pytest.approx(9.0)  # not 5: Heun is priced by its evaluations


def test_rows_without_nfe_count_one_evaluation_per_step():
    rows = history(scheduler=["euler"], steps=[4], nfe=[None], time_denoise_s=[8.0], time_total_s=[10.0])
    per_eval, _, _ = rates(rows, make_spec(compose_config("model=tiny-sd")))
    assert per_eval == pytest.approx(2.0)
