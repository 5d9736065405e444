"""Timers that are right on CUDA: kernels run asynchronously, so clocks are read only after a synchronize."""

from collections import defaultdict
from contextlib import contextmanager
from time import perf_counter


class Timer:
    """Accumulates named spans; `laps[name]` keeps each span, `totals[name]` their sum (seconds)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.laps: dict[str, list[float]] = defaultdict(list)

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        start = perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.laps[name].append(perf_counter() - start)

    @property
    def totals(self) -> dict[str, float]:
        return {name: sum(laps) for name, laps in self.laps.items()}
