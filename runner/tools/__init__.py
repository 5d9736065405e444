"""Command-line tools that write files the runner ships (embedded tiny models)."""
