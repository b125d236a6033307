"""The signals that stop a run, in one place for the training loop and the data workers.

Termination (`timeout`, `docker stop`, SLURM at preemption), Ctrl-C, and the warnings a
scheduler sends before its time limit: SLURM's `--signal` (SIGUSR1 by convention) and
submitit's (SIGUSR2 unless `SUBMITIT_PREEMPT_SIGNAL` names another). A terminal's Ctrl-C
and SLURM signal every process of a job, data workers included: the workers leave them to
the main process (`ignore_in_worker`), which stops the run at a step boundary and saves it.
"""

from __future__ import annotations

import os
import signal
import threading


def _named(name: str) -> signal.Signals | None:
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)


#: Every signal that stops a run gracefully (a second one of them stops it at once).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(dict.fromkeys(
    s for s in (signal.SIGTERM, signal.SIGINT, _named("USR1"), _named("USR2"),
                _named(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))
    if s is not None
))


def ignore_in_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: a worker killed by a stop signal would crash the run before it can save.

    SIGTERM is also how the worker's own parent ends it (DataLoader shutdown, and Python's exit,
    which terminates daemonic children and waits for them): torch's worker handler exits on the
    parent's SIGTERM and dies of anyone else's. Here a thread waits for it instead and exits on
    the parent's alone, so a SIGTERM to the whole job no longer kills the workers under the run.
    """
    for signum in STOP_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there the parent's rule stays torch's
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # pending until the thread takes it
        threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()


def _exit_on_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as torch's worker handler does: nothing of the worker's needs saving
