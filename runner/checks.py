"""The one way a bad value is refused: ConfigError with a line that names the key, the value and what is allowed.

Every module that checks user input (spec, precision, the families) raises through `fail`, so the CLI can print
the message as one `error:` line and exit 2.
"""


class ConfigError(ValueError):
    """A bad config value: the message names the key, the value and what is allowed."""


def fail(key: str, value, allowed: str):
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def as_int(key, value, low=None, high=None, allowed=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(key, value, allowed or "an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        fail(key, value, allowed or f"an integer in {low}..{high}")
    return value


def as_number(key, value, low, allowed) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < low:
        fail(key, value, allowed)
    return float(value)


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
