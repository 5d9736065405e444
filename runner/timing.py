"""Per-job timings and peak memory that can be trusted: the `time_*_s` / `mem_*` columns of the results table.

On CUDA, kernels run asynchronously: every span synchronizes before it reads the clock, so a span holds the
work issued inside it and nothing else. Peak-memory counters are reset when a job starts, since jobs share a
process: CUDA's peak allocated/reserved on a GPU, the peak resident set size (RSS) on CPU.
"""

import functools
import statistics
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter

MB = 2**20


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


class JobClock:
    """A job's wall clock, its Timer and its peak memory, started together (counters reset) when a job starts."""

    def __init__(self, device: str):
        self.device = str(device)
        self.timer = Timer(device)
        self.memory = PeakMemory(device)
        self.start = perf_counter()
        self.shared_s = 0.0  # a fused sweep point's share of the batch drawn before its job started (runner.fused)

    def columns(self, n_images: int, cached: bool, warmed_up: bool) -> dict:
        """The job's `time_*_s` and `mem_*` columns (the same values on each of its rows).

        `warmed_up`: whether the job ran an untimed-in-the-loop warm-up forward first (CUDA and compiled
        models do, see runner.precision.warm_up). Where it did not, the first job after a load carries the
        first-call overhead in its first step: `time_includes_warmup` says so, and `time_step_p50_s` is
        the number to compare across jobs.
        """
        self.timer._sync()
        total = perf_counter() - self.start + self.shared_s
        laps, totals = self.timer.laps, self.timer.totals
        steps = laps.get("step", [])
        return {
            "model_cached": cached,
            "time_load_s": 0.0 if cached else totals.get("load", 0.0),
            "time_warmup_s": totals.get("warmup", 0.0),
            "time_compile_s": totals.get("compile", 0.0),
            "time_includes_warmup": not cached and not warmed_up,
            "time_encode_s": totals.get("encode", 0.0),
            "time_denoise_s": sum(steps),
            "time_step_mean_s": statistics.fmean(steps) if steps else 0.0,
            "time_step_p50_s": percentile(steps, 50),
            "time_step_p90_s": percentile(steps, 90),
            "time_first_step_s": steps[0] if steps else 0.0,
            "time_unet_s": totals.get("unet", 0.0),
            "time_scheduler_s": totals.get("scheduler", 0.0),
            "time_decode_s": totals.get("vae_decode", 0.0),
            "time_save_s": totals.get("save", 0.0),
            "time_metrics_s": totals.get("metrics", 0.0),
            "time_log_s": totals.get("log", 0.0),
            "time_total_s": total,
            "images_per_s": n_images / total if total else 0.0,
            **self.memory.columns(),
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default), of a few step times."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class PeakMemory:
    """Peak memory since this object was made: CUDA allocator peaks on a GPU, peak RSS of the process on CPU.

    On Linux the kernel's RSS high-water mark (VmHWM) is reset per job through /proc/self/clear_refs; where that
    is not possible the process-lifetime peak is reported and `mem_rss_scope` says "process", not "job".
    """

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(device)
            self.device = device
        self.rss_scope = "job" if reset_peak_rss() else "process"

    def columns(self) -> dict:
        columns = {"mem_peak_rss_mb": peak_rss_bytes() / MB, "mem_rss_scope": self.rss_scope,
                   # NaN, not 0, on CPU: nothing was measured, and charts and tables then leave it out
                   "mem_cuda_peak_allocated_mb": float("nan"), "mem_cuda_peak_reserved_mb": float("nan")}
        if self.cuda:
            import torch

            columns["mem_cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / MB
            columns["mem_cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / MB
        return columns


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def hardware(device: str) -> dict:
    """What a timing row needs to be compared: torch and CUDA versions, GPU name and driver."""
    import torch

    cuda = str(device).startswith("cuda")
    return {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "gpu": torch.cuda.get_device_name(device) if cuda else "",
        "gpu_driver": gpu_driver() if cuda else "",
    }


@functools.cache
def gpu_driver() -> str:
    """The NVIDIA driver version (from nvidia-smi; torch does not expose it), or "" where it cannot be read."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""
