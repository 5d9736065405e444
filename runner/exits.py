"""Exits that must stay exits: a job's error handling turns failures into failed rows, but never an exit."""

import contextlib


def exit_in_disguise(err: BaseException) -> BaseException | None:
    """The SystemExit or KeyboardInterrupt inside `err`, if that is what it is. A signal handler's exit (submitit's
    on SLURM preemption: requeue, then sys.exit) that lands while a library import is creating a class comes out
    of Python 3.11 as `RuntimeError: Error calling __set_name__`. It must still end the job as an exit, so that
    the requeued job draws the point, instead of becoming a failed point."""
    cause = err.__cause__
    return cause if isinstance(cause, (SystemExit, KeyboardInterrupt)) else None


@contextlib.contextmanager
def exits_unwrapped():
    """Around a whole job: an exit in disguise (see exit_in_disguise) leaves as the exit it is."""
    try:
        yield
    except Exception as err:
        if (real_exit := exit_in_disguise(err)) is None:
            raise
        raise real_exit from None
