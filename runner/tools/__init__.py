"""Developer tools, outside the path a user's job runs: the benchmark, the trainer of the embedded digit models, and
the builder of the embedded tiny models (python -m runner.tools.bench | train_digits | tiny)."""
