"""The results table's columns, declared once: every module that writes or reads rows names them from here.

A row is, in this order: the axes (what the user chose), the job context (where and as what it ran), the
environment (what reproducing it needs), the precision options, the image (prompt, seed, files, hashes, model
evaluations), the metrics, the timings, and the status.
"""

# What users sweep, in the order grids and reports show them.
AXES = ("model", "scheduler", "schedule", "steps", "shift", "guidance", "seed", "prompt", "negative_prompt",
        "strength", "precision", "height", "width")
# Every axis except scheduler and steps: images that share these show the same content, whatever solved it
# (runner.convergence compares them with a reference).
CONTENT_AXES = ("model", "prompt", "negative_prompt", "seed", "guidance", "height", "width", "precision", "strength",
                "init_image")
# The axes as a checked spec holds them (option names, not class names), first in every row.
SPEC_COLUMNS = ("model", "scheduler", "schedule", "precision", "steps", "guidance", "negative_prompt", "height", "width",
                "device", "dtype", "strength", "init_image", "scheduler_class", "model_name_or_path", "family", "shift")
# runner.context.JobContext: where the row was drawn and as what.
CONTEXT_COLUMNS = ("job_dir", "sweep_dir", "job_num", "overrides", "name", "config_hash", "worker_pid",
                   "cuda_visible_devices", "config")
# Versions and hardware: what reproducing a row needs to know.
ENVIRONMENT_COLUMNS = ("torch_version", "cuda_version", "gpu", "gpu_driver", "diffusers_version",
                       "transformers_version", "python_version", "hostname", "cpu_threads")
# Those that can change pixels: runner.reproduce warns when they differ.
PIXEL_ENVIRONMENT_COLUMNS = ("torch_version", "diffusers_version", "transformers_version", "device", "gpu",
                             "cpu_threads")
# Per image: model evaluations counted by the loop (runner.sampling.Tally).
COST_COLUMNS = ("nfe", "unet_evals")
# A fused sweep (runner.fused): the group the point was drawn with and the images of its batch; empty when the point
# drew its images alone. Its time columns are then its share of the batch, split by images.
FUSED_COLUMNS = ("fused_group", "fused_batch_size")
# Written into each PNG's `runner` text chunk (and A1111's `parameters` line).
PNG_KEYS = ("model", "scheduler", "schedule", "steps", "guidance", "seed", "prompt", "negative_prompt", "height", "width",
            "strength", "init_image", "precision", "config_hash")
# The short table of a W&B run and of the report: enough to read a row at a glance.
SUMMARY_COLUMNS = ("model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt", "height", "width",
                   "precision", "device", "status", "error", "nfe", "time_total_s", "image_sha256", "image_path")
# Timings and memory (runner.timing.JobClock) share these prefixes; they are the same on every row of a job.
JOB_SUMMARY_PREFIXES = ("time_", "mem_", "images_per_s", "model_cached", "compile_")
# Per-image metrics (runner.metrics): every row has them all, empty where not computed.
IMAGE_METRIC_COLUMNS = ("prompt_adherence", "class_confidence", "predicted_digit", "clip_score")
SCORE_COLUMNS = ("prompt_adherence", "class_confidence", "clip_score")  # scores, not labels: they average per job
QUALITY_COLUMNS = ("prompt_adherence", "clip_score")  # how well an image follows its prompt: charted in reports
# Distance to a reference image of the same content (runner.convergence), filled in sweep tables.
# With converged references (runner.reference): the PSNR between the reference and its half-step solve, the
# tolerance it is held to and the outcome. `stochastic`: the row's sampler draws fresh noise (compare it by distribution instead).
CONVERGENCE_COLUMNS = ("psnr_to_ref", "ssim_to_ref", "latent_mse_to_ref", "ref_scheduler", "ref_steps",
                       "ref_converged", "ref_check_psnr", "ref_tolerance_db", "stochastic")
# Per cell (runner.fid): FID and KID of a cell's images against held-out real digits, in the digit classifier's
# feature space; the same values on every row of the cell. Filled in sweep tables.
DISTRIBUTION_COLUMNS = ("fid_digits", "kid_digits", "kid_digits_std")
# What a sweep's results.parquet adds to the job rows (runner.callbacks); runner.results.load joins them back.
SWEEP_METRIC_COLUMNS = CONVERGENCE_COLUMNS + DISTRIBUTION_COLUMNS
# The report's table, in this order (`job` and `image` are the names of the job dir and PNG).
REPORT_COLUMNS = ("sweep", "job", "model", "scheduler", "steps", "guidance", "seed", "prompt", "negative_prompt",
                  "height", "width", "precision", "strength", "status", *IMAGE_METRIC_COLUMNS, *CONVERGENCE_COLUMNS,
                  *DISTRIBUTION_COLUMNS,
                  "nfe", "time_per_image_s", "time_per_step_s", "time_total_s", "device", "gpu", "image", "error")
# The report's table holds these too, hidden until asked for: long text, paths and hashes.
REPORT_HIDDEN_COLUMNS = ("config", "overrides", "name", "job_dir", "sweep_dir", "image_path", "latent_path",
                         "image_sha256", "config_hash", "model_name_or_path", "scheduler_class", "init_image")
# What the sweep viewer can print under each grid cell (and mark the best of a row by); lower is better for these.
VIEWER_CAPTION_COLUMNS = (*QUALITY_COLUMNS, "class_confidence", "psnr_to_ref", "ssim_to_ref", "latent_mse_to_ref",
                          "time_per_image_s", "time_per_step_s", "nfe")
LOWER_IS_BETTER = ("latent_mse_to_ref", "time_per_image_s", "time_per_step_s", "time_total_s", "nfe")
# A cell's detail in the viewer: what identifies the image beside its axes, metrics and timings.
VIEWER_IDENTITY_COLUMNS = ("sweep", "status", "error", "config_hash", "image_sha256", "nfe", "device", "gpu",
                           "model_name_or_path", "scheduler_class")
