"""Faults on purpose: tests make sweep point k fail through the real code paths.

    RUNNER_FAULT="<k>:error|oom|enospc|exit-in-import|exit-in-load|crash|fused"   (<k> = * : every point)

`error` and `oom` (torch.cuda.OutOfMemoryError) raise before sampling; `enospc` raises "No space left on device"
where the job writes its first image. `exit-in-import` and `exit-in-load` create a class whose creation calls
sys.exit(-1), as a preemption signal does when it lands during a library import: where the job imports its
libraries (before its error handling), and after the model loaded (inside it; diffusers imports lazily).
`crash` raises in the Hydra task before the drawing's own error handling (runner.job). `fused` raises while a
fused sweep draws the batch that holds point k (runner.fused): its points then draw alone.
"""

import os
import sys

FAULT_ENV = "RUNNER_FAULT"


def inject_fault(job_num: int, stage: str) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if not fault or fault.split(":")[0] not in (str(job_num), "*"):  # "*": every point
        return
    kind = fault.split(":", 1)[1] if ":" in fault else "error"
    if stage == "sample" and kind == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by RUNNER_FAULT)")
    if stage == "job" and kind == "crash":
        raise RuntimeError("crash injected by RUNNER_FAULT")
    if stage == "fused" and kind == "fused":  # the fused batch holding point k raises (runner.fused)
        raise RuntimeError("fused batch fault injected by RUNNER_FAULT")
    if stage == "sample" and kind == "error":
        raise RuntimeError("fault injected by RUNNER_FAULT")
    if (stage, kind) in (("import", "exit-in-import"), ("sample", "exit-in-load")):
        class ExitsWhenNamed:
            def __set_name__(self, owner, name):
                sys.exit(-1)

        type("LibraryClass", (), {"handle": ExitsWhenNamed()})
    if stage == "save" and kind == "enospc":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected by RUNNER_FAULT)")
