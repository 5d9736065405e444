"""`python -m runner.wandb_workspace SWEEP [--entity E] [--project P] [--name N] [--dry-run]`: a saved W&B
workspace for a sweep's runs. A thin entry point: the builder is runner/loggers/wandb_workspace.py (only
runner/loggers/ imports wandb)."""

import sys

from runner.loggers.wandb_workspace import main

if __name__ == "__main__":
    sys.exit(main())
